"""Verification: one target forward over each request's last token and its
draft chain, on top of the request's KV (an EXTEND forward), then the tokens
the target itself would have produced, as far as the drafts agree.

Exactness. The drafts are a chain of greedy guesses, so the draft distribution
is a point mass on each guess. For a point mass, speculative sampling's
rejection rule (accept d with probability min(1, p(d)/q(d)) = p(d), else draw
from the residual p without d) is the same as drawing x from the target's p
and accepting d iff x == d, else emitting x. We draw x with the target's own
sampler (temperature, top-p/top-k/min-p, penalties as of that position), whose
seeded noise depends only on (seed, step, token): every emitted token is
exactly the token decoding without speculation would have sampled. Penalty
state advances token by token (masked per row), so position i sees the
history up to its own draft."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from radixserve.layers.sampler import Sampler
from radixserve.managers.req import Req
from radixserve.managers.schedule_batch import ScheduleBatch
from radixserve.model_executor.forward_batch import ForwardMode
from radixserve.sampling.sampling_batch_info import SamplingBatchInfo

HostLogprobs = Tuple[Optional[list], Optional[list], Optional[list]]


@dataclass
class SpecResult:
    """A verify step's outcome, read back to the host (the step ran synchronously)."""

    batch: ScheduleBatch
    reqs: List[Req]
    tokens: List[List[int]]  # per request: the accepted drafts, then the target's own next token
    num_drafts: List[int]  # per request: drafts verified
    logprobs: List[HostLogprobs]  # per position: the batch's (logprobs, top values, top ids) lists
    is_extend: bool = False
    decode_part: None = None

    def all_reqs(self) -> List[Req]:
        return self.reqs


def prepare_verify(batch: ScheduleBatch, drafts: List[List[int]]) -> bool:
    """KV slots and input tensors for [last token, drafts...] of every request
    at positions [seq_len, seq_len + 1 + len(drafts)). False (nothing
    allocated) when the allocator is short. The requests' kv_len covers the new
    slots at once, so a failed batch frees them; ResultProcessor trims them to
    what was accepted."""
    pools, dev = batch.pools, batch.device
    table = pools.req_to_token_pool.req_to_token
    prefix_lens = batch.seq_lens_cpu.tolist()
    extend_lens = [1 + len(d) for d in drafts]
    seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens)]
    rows = batch.req_pool_indices
    last_locs = table[rows, batch.seq_lens - 1].tolist()
    out_cache_loc = pools.allocator.alloc_extend(prefix_lens, seq_lens, last_locs)
    if out_cache_loc is None:
        return False
    last_ids = batch.last_token_ids.tolist()
    input_ids, positions, start = [], [], 0
    for req, last, draft, prefix, seq in zip(batch.reqs, last_ids, drafts, prefix_lens, seq_lens):
        table[req.req_pool_idx, prefix:seq] = out_cache_loc[start:start + seq - prefix]
        input_ids += [last] + draft
        positions.append(torch.arange(prefix, seq))
        req.kv_len = seq
        start += seq - prefix
    batch.forward_mode = ForwardMode.EXTEND
    batch.input_ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
    batch.positions = torch.cat(positions).to(dev)
    batch.out_cache_loc = out_cache_loc
    batch.seq_lens_cpu = torch.tensor(seq_lens, dtype=torch.int64)
    batch.seq_lens = batch.seq_lens_cpu.to(dev)
    batch.logits_indices = torch.arange(start, dtype=torch.int64, device=dev)  # every position's logits
    batch.last_logit_rows = torch.tensor(seq_lens, device=dev) - torch.tensor(prefix_lens, device=dev)
    batch.last_logit_rows = torch.cumsum(batch.last_logit_rows, 0) - 1
    batch._prefix_lens, batch._extend_lens = prefix_lens, extend_lens
    batch.spec_drafts = drafts
    return True


def accept(batch: ScheduleBatch, logits: torch.Tensor, info: SamplingBatchInfo, sampler: Sampler) -> SpecResult:
    """logits: [num_tokens, vocab], one row per verified position, in batch order."""
    if is_plain_greedy(info):
        return accept_greedy(batch, logits, info)
    return accept_sampled(batch, logits, info, sampler)


def is_plain_greedy(info: SamplingBatchInfo) -> bool:
    """Every row greedy, and nothing that changes logits from one position to
    the next (penalties, a bias, min_new_tokens) or asks for logprobs: each
    position's token is the argmax of its own logits."""
    return (info.all_greedy and not info.return_logprob and info.grammar_mask is None and info.seen_mask is None
            and info.output_counts is None and info.logit_bias is None and info.stop_mask is None)


def _draft_layout(drafts: List[List[int]], last_logit_rows: torch.Tensor):
    """(width, [bs] drafts per request, [bs] each request's first row, [bs, width - 1] drafts padded with -1)."""
    dev = last_logit_rows.device
    bs, width = len(drafts), max(len(d) for d in drafts) + 1
    num_drafts = torch.tensor([len(d) for d in drafts], device=dev)
    padded = torch.tensor([d + [-1] * (width - 1 - len(d)) for d in drafts], dtype=torch.int64,
                          device=dev).reshape(bs, width - 1)
    return width, num_drafts, last_logit_rows - num_drafts, padded


def accept_greedy(batch: ScheduleBatch, logits: torch.Tensor, info: SamplingBatchInfo) -> SpecResult:
    """One argmax over every verified position, then each request's run: its
    drafts as far as they equal the argmax, and the argmax after them."""
    drafts: List[List[int]] = batch.spec_drafts
    width, num_drafts, starts, padded = _draft_layout(drafts, batch.last_logit_rows)
    offsets = torch.minimum(torch.arange(width, device=logits.device)[None, :], num_drafts[:, None])
    chosen = logits.argmax(-1)[starts[:, None] + offsets]  # [bs, width]
    counts = 1 + (chosen[:, :-1] == padded).int().cumprod(1).sum(1)
    info.steps += counts.to(info.steps.dtype)  # (as a token-by-token record of the emitted ones)
    rows = torch.cat([chosen, counts[:, None]], 1).tolist()  # the step's one host sync
    tokens = [row[:row[-1]] for row in rows]
    return SpecResult(batch, list(batch.reqs), tokens, [len(d) for d in drafts],
                      [(None, None, None)] * width)


def accept_sampled(batch: ScheduleBatch, logits: torch.Tensor, info: SamplingBatchInfo,
                   sampler: Sampler) -> SpecResult:
    """Position by position through the target's own sampler (module docstring)."""
    drafts: List[List[int]] = batch.spec_drafts
    dev = logits.device
    width, num_drafts, starts, padded = _draft_layout(drafts, batch.last_logit_rows)
    bs = len(drafts)
    alive = torch.ones(bs, dtype=torch.bool, device=dev)
    chosen, emitted, outs = [], [], []
    for i in range(width):
        row = starts + torch.minimum(num_drafts, torch.tensor(i, device=dev))
        out = sampler.forward(logits[row], info)
        info.record(out.next_token_ids, mask=alive)
        chosen.append(out.next_token_ids)
        emitted.append(alive)
        outs.append(out)
        if i < width - 1:
            alive = alive & (out.next_token_ids == padded[:, i])
    ids = torch.stack(chosen, 1).tolist()  # the step's one host sync
    counts = torch.stack(emitted, 1).sum(1).tolist()
    tokens = [row_ids[:n] for row_ids, n in zip(ids, counts)]
    return SpecResult(batch, list(batch.reqs), tokens, [len(d) for d in drafts],
                      [host_logprobs(o) for o in outs])


def host_logprobs(out) -> HostLogprobs:
    if out.logprobs is None:
        return None, None, None
    vals = out.top_logprobs_val.tolist() if out.top_logprobs_val is not None else None
    idx = out.top_logprobs_idx.tolist() if out.top_logprobs_idx is not None else None
    return out.logprobs.tolist(), vals, idx


def trim_kv(prefix_cache, req: Req, new_kv_len: int) -> None:
    """Free the slots of positions [new_kv_len, kv_len): rejected drafts (whole
    pages only; a partly used last page stays with the request)."""
    page = prefix_cache.page_size
    keep_to = -(-new_kv_len // page) * page
    if req.kv_len > keep_to:
        prefix_cache.allocator.free(prefix_cache.table[req.req_pool_idx, keep_to:req.kv_len])
    req.kv_len = new_kv_len
