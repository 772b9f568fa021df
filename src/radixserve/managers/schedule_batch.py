"""ScheduleBatch: the scheduler's view of one batch, and how it becomes a ForwardBatch.

Decode state lives in tensors (seq_lens, req_pool_indices, last sampled ids) so a
decode step is a few tensor ops whatever the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from radixserve.managers.req import Req
from radixserve.mem_cache.memory_pools import MemoryPools
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode


@dataclass
class ExtendPlan:
    """What one request contributes to an extend batch."""

    req: Req
    extend_len: int  # new tokens this forward (a chunk may be shorter than the rest)
    # Positions (absolute, in this chunk) whose logits give input logprobs.
    input_logprob_positions: range
    # True when this extend reaches the end of the request's tokens, so the
    # logits of its last token sample the next output token.
    completes_prefill: bool


class ScheduleBatch:
    def __init__(self, reqs: List[Req], pools: MemoryPools, device: torch.device) -> None:
        self.reqs = reqs
        self.pools = pools
        self.device = device
        self.forward_mode = ForwardMode.DECODE
        self.sampling_info = None  # SamplingBatchInfo; filtered and merged along with reqs
        self.plans: List[ExtendPlan] = []
        # Decode state (valid for a running batch)
        self.req_pool_indices = torch.empty(0, dtype=torch.int64, device=device)
        self.seq_lens = torch.empty(0, dtype=torch.int64, device=device)
        self.seq_lens_cpu = torch.empty(0, dtype=torch.int64)
        self.last_token_ids = torch.empty(0, dtype=torch.int64, device=device)
        # M-RoPE: a decode position is its index + the request's delta (0 without images)
        self.rope_deltas = torch.empty(0, dtype=torch.int64, device=device)
        # Per forward
        self.input_ids: Optional[torch.Tensor] = None
        self.positions: Optional[torch.Tensor] = None
        self.out_cache_loc: Optional[torch.Tensor] = None
        self.logits_indices: Optional[torch.Tensor] = None
        self.last_logit_rows: Optional[torch.Tensor] = None
        self.mrope_positions: Optional[torch.Tensor] = None
        self.mm_items: Optional[list] = None
        # A verify step's draft trees per request (speculative/verify.py), else None,
        # and each verified row's tree mask when a tree branches (else causal attention)
        self.spec_drafts: Optional[list] = None
        self.spec_tree_mask: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.reqs)

    def is_empty(self) -> bool:
        return not self.reqs

    # ---- extend ----
    def prepare_for_extend(self, plans: List[ExtendPlan]) -> bool:
        """Allocate rows and KV slots and build the input tensors. False (and
        nothing allocated) when memory is short."""
        pools, dev = self.pools, self.device
        self.forward_mode, self.plans = ForwardMode.EXTEND, plans
        prefix_lens = [p.req.kv_len for p in plans]
        seq_lens = [p.req.kv_len + p.extend_len for p in plans]
        new_rows = [p.req for p in plans if p.req.req_pool_idx is None]
        if len(new_rows) > pools.req_to_token_pool.available_size():
            return False
        P = pools.allocator.page_size
        needed = sum(-(-s // P) - (-(-p // P)) for p, s in zip(prefix_lens, seq_lens)) * P
        if not pools.prefix_cache.make_room(needed):
            return False
        table = pools.req_to_token_pool.req_to_token
        for req in new_rows:
            req.req_pool_idx = pools.req_to_token_pool.alloc()
            if req.prefix_len:
                table[req.req_pool_idx, :req.prefix_len] = req.prefix_slots
            req.prefix_slots = None
        last_locs = [
            int(table[p.req.req_pool_idx, p.req.kv_len - 1]) if p.req.kv_len else 0 for p in plans
        ]
        out_cache_loc = pools.allocator.alloc_extend(prefix_lens, seq_lens, last_locs)
        assert out_cache_loc is not None, "make_room promised enough slots"

        input_ids, positions, logit_rows, last_rows, start = [], [], [], [], 0
        with_images = any(p.req.mm is not None for p in plans)
        mrope, mm_items = [], []
        for p, prefix, seq in zip(plans, prefix_lens, seq_lens):
            if with_images:
                mm = p.req.mm
                mrope.append(mm.positions(prefix, seq) if mm is not None else torch.arange(prefix, seq).expand(3, -1))
                if mm is not None:
                    mm_items.append((mm, prefix, seq))
            table[p.req.req_pool_idx, prefix:seq] = out_cache_loc[start:start + p.extend_len]
            input_ids.extend(p.req.fill_ids[prefix:seq])
            positions.append(torch.arange(prefix, seq))
            logit_rows.extend(start + pos - prefix for pos in p.input_logprob_positions)
            last_rows.append(len(logit_rows))
            logit_rows.append(start + p.extend_len - 1)
            p.req.kv_len = seq
            start += p.extend_len

        self.req_pool_indices = torch.tensor([p.req.req_pool_idx for p in plans], device=dev)
        self.seq_lens_cpu = torch.tensor(seq_lens, dtype=torch.int64)
        self.seq_lens = self.seq_lens_cpu.to(dev)
        self.input_ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        self.positions = torch.cat(positions).to(dev)
        self.out_cache_loc = out_cache_loc
        self.logits_indices = torch.tensor(logit_rows, dtype=torch.int64, device=dev)
        self.last_logit_rows = torch.tensor(last_rows, dtype=torch.int64, device=dev)
        self._prefix_lens, self._extend_lens = prefix_lens, [p.extend_len for p in plans]
        self.mrope_positions = torch.cat(mrope, dim=1).to(dev) if with_images else None
        self.mm_items = mm_items or None
        self.rope_deltas = rope_deltas_of([p.req for p in plans], dev)
        return True

    # ---- decode ----
    def decode_tokens_needed(self, tokens_per_req: int = 1) -> int:
        """KV tokens the next decode step must allocate (whole pages), when
        each request adds tokens_per_req positions (more than one: a verify step)."""
        P = self.pools.allocator.page_size
        if P == 1:
            return len(self.reqs) * tokens_per_req
        pages = (self.seq_lens_cpu + tokens_per_req + P - 1) // P - (self.seq_lens_cpu + P - 1) // P
        return int(pages.sum()) * P

    def prepare_for_decode(self) -> bool:
        self.forward_mode = ForwardMode.DECODE
        self.spec_drafts, self.spec_tree_mask = None, None
        table = self.pools.req_to_token_pool.req_to_token
        last_locs = table[self.req_pool_indices, self.seq_lens - 1]
        out_cache_loc = self.pools.allocator.alloc_decode(self.seq_lens, last_locs, self.seq_lens_cpu)
        if out_cache_loc is None:
            return False
        table[self.req_pool_indices, self.seq_lens] = out_cache_loc
        self.input_ids = self.last_token_ids
        self.positions = self.seq_lens + self.rope_deltas
        self.mrope_positions, self.mm_items = None, None
        self.out_cache_loc = out_cache_loc
        self.seq_lens = self.seq_lens + 1
        self.seq_lens_cpu = self.seq_lens_cpu + 1
        self.logits_indices = None
        self.last_logit_rows = None
        for req in self.reqs:
            req.kv_len += 1
        return True

    # ---- membership ----
    def filter(self, keep: List[int]) -> None:
        """Keep only the requests at these indices (in order)."""
        if len(keep) == len(self.reqs):
            return
        idx = torch.tensor(keep, dtype=torch.int64)
        dev_idx = idx.to(self.device)
        self.reqs = [self.reqs[i] for i in keep]
        self.req_pool_indices = self.req_pool_indices[dev_idx]
        self.seq_lens = self.seq_lens[dev_idx]
        self.seq_lens_cpu = self.seq_lens_cpu[idx]
        self.last_token_ids = self.last_token_ids[dev_idx]
        self.rope_deltas = self.rope_deltas[dev_idx]
        if self.sampling_info is not None:
            self.sampling_info.filter(dev_idx, self.reqs)

    def filter_out(self, reqs: List[Req]) -> None:
        """Drop these requests (by identity) if they are in the batch."""
        gone = set(map(id, reqs))
        self.filter([i for i, r in enumerate(self.reqs) if id(r) not in gone])

    def merge(self, other: "ScheduleBatch") -> None:
        if self.is_empty():
            self.sampling_info = other.sampling_info
        elif self.sampling_info is not None and other.sampling_info is not None:
            self.sampling_info.merge(other.sampling_info, self.reqs + other.reqs)
        else:
            self.sampling_info = None  # rebuilt from the requests before the next forward
        self.reqs = self.reqs + other.reqs
        self.req_pool_indices = torch.cat([self.req_pool_indices, other.req_pool_indices])
        self.seq_lens = torch.cat([self.seq_lens, other.seq_lens])
        self.seq_lens_cpu = torch.cat([self.seq_lens_cpu, other.seq_lens_cpu])
        self.last_token_ids = torch.cat([self.last_token_ids, other.last_token_ids])
        self.rope_deltas = torch.cat([self.rope_deltas, other.rope_deltas])

    # ---- to the model ----
    def to_forward_batch(self) -> ForwardBatch:
        """Everything the model runner needs for this batch's forward; the runner
        attaches its attention backend and that backend's metadata."""
        fb = ForwardBatch(
            forward_mode=self.forward_mode,
            batch_size=len(self.reqs),
            input_ids=self.input_ids,
            positions=self.positions,
            req_pool_indices=self.req_pool_indices,
            seq_lens=self.seq_lens,
            out_cache_loc=self.out_cache_loc,
            seq_lens_cpu=self.seq_lens_cpu.tolist(),
            logits_indices=self.logits_indices,
            last_logit_rows=self.last_logit_rows,
            req_to_token_pool=self.pools.req_to_token_pool,
            kv_pool=self.pools.kv_pool,
            lora_ids=[r.lora_id for r in self.reqs],
            mrope_positions=self.mrope_positions,
            mm_items=self.mm_items,
            spec_tree_mask=self.spec_tree_mask,
            as_decode_step=self.spec_drafts is not None,
        )
        if self.forward_mode.is_extend():
            set_extend_lens(fb, self._prefix_lens, self._extend_lens, self.device)
        return fb


def set_extend_lens(fb: ForwardBatch, prefix_lens: List[int], extend_lens: List[int], device: torch.device) -> None:
    fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu = prefix_lens, extend_lens
    fb.extend_prefix_lens = torch.tensor(prefix_lens, device=device)
    fb.extend_seq_lens = torch.tensor(extend_lens, device=device)
    fb.extend_start_loc = torch.cumsum(fb.extend_seq_lens, 0) - fb.extend_seq_lens


def mixed_forward_batch(decode: ScheduleBatch, extend: ScheduleBatch) -> ForwardBatch:
    """One forward for a prepared decode step and a prepared extend batch
    (--enable-mixed-chunk). The decode requests come first, each an extend of
    one token on top of its KV, so the logits' first rows are theirs; their
    input ids stay on the device (the overlap schedule may not have read them)."""
    n = len(decode)
    decode_rows = torch.arange(n, dtype=torch.int64, device=decode.device)
    decode_seq_lens = decode.seq_lens_cpu.tolist()

    def both(name: str) -> torch.Tensor:
        return torch.cat([getattr(decode, name), getattr(extend, name)])

    fb = ForwardBatch(
        forward_mode=ForwardMode.MIXED,
        batch_size=n + len(extend),
        input_ids=both("input_ids"),
        positions=both("positions"),
        req_pool_indices=both("req_pool_indices"),
        seq_lens=both("seq_lens"),
        out_cache_loc=both("out_cache_loc"),
        seq_lens_cpu=decode_seq_lens + extend.seq_lens_cpu.tolist(),
        logits_indices=torch.cat([decode_rows, extend.logits_indices + n]),
        last_logit_rows=torch.cat([decode_rows, extend.last_logit_rows + n]),
        req_to_token_pool=decode.pools.req_to_token_pool,
        kv_pool=decode.pools.kv_pool,
        num_decode_rows=n,
        lora_ids=[r.lora_id for r in decode.reqs + extend.reqs],
        mm_items=extend.mm_items,
    )
    if extend.mrope_positions is not None:
        fb.mrope_positions = torch.cat([decode.positions.expand(3, -1), extend.mrope_positions], dim=1)
    set_extend_lens(fb, [s - 1 for s in decode_seq_lens] + extend._prefix_lens,
                    [1] * n + extend._extend_lens, decode.device)
    return fb


def rope_deltas_of(reqs: List[Req], device: torch.device) -> torch.Tensor:
    """Each request's M-RoPE offset for its decode positions (0 without images)."""
    return torch.tensor([r.mm.rope_delta if r.mm is not None else 0 for r in reqs], dtype=torch.int64, device=device)
