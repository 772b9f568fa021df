"""A Scheduler over real KV pools, allocator and radix cache, with a fake model
runner instead of a model, for unit tests that run in milliseconds.

The fake runner is a tiny "model" that really uses the KV cache: each forward
writes the new tokens into the slots the scheduler gave them, reads every
request's whole sequence back through its req_to_token row, and puts the
logit peak on next_token(sequence). So a request's output equals
reference_output(prompt) only if its KV slots held the right tokens at every
step, through chunking, radix hits, retraction and aborts."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import torch

from radixserve.managers import io_struct as io
from radixserve.managers.scheduler import Scheduler
from radixserve.mem_cache.allocator import ReqToTokenPool, TokenAllocator
from radixserve.mem_cache.prefix_cache import PrefixCache
from radixserve.model_executor.memory_saver import ReleasedMemory
from radixserve.model_executor.model_runner import LogitsOutput
from radixserve.sampling.sampling_params import SamplingParams
from radixserve.server_args import ServerArgs

VOCAB = 101
EOS = 0


def next_token(tokens: List[int]) -> int:
    """The fake model: a hash of the whole sequence, in [1, VOCAB) (never EOS)."""
    h = 0
    for t in tokens:
        h = (h * 31 + t + 1) % 1_000_003
    return 1 + h % (VOCAB - 1)


def reference_output(prompt: List[int], n: int) -> List[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        out.append(next_token(seq))
        seq.append(out[-1])
    return out


class FakeRunner:
    """What the Scheduler needs from a ModelRunner: pools, sizes, forward, weights."""

    def __init__(self, num_tokens: int, page_size: int = 1, max_running: int = 8, context_len: int = 512,
                 radix: bool = True) -> None:
        self.device, self.dtype, self.weight_format = torch.device("cpu"), torch.float32, None
        self.vocab_size, self.context_len, self.max_running_requests = VOCAB, context_len, max_running
        allocator = TokenAllocator(num_tokens, page_size, self.device)
        self.max_total_num_tokens = allocator.total_tokens
        rows = ReqToTokenPool(max_running + 1, context_len + 1, self.device)
        self.pools = SimpleNamespace(req_to_token_pool=rows, allocator=allocator, kv_pool=None,
                                     prefix_cache=PrefixCache(rows, allocator, enabled=radix))
        self.slot_tokens = torch.full((allocator.num_slots,), -1, dtype=torch.int64)  # the "KV"
        # fail_when(forward_mode, sequences) -> True raises inside forward (a bug that slipped through)
        self.fail_when: Optional[Callable[[object, List[List[int]]], bool]] = None
        self.weights = "w0"
        self.num_forwards = 0

    def forward(self, batch) -> LogitsOutput:
        self.num_forwards += 1
        self.slot_tokens[batch.out_cache_loc] = batch.input_ids
        table = self.pools.req_to_token_pool.req_to_token
        seqs = []
        for row, seq_len in zip(batch.req_pool_indices.tolist(), batch.seq_lens.tolist()):
            tokens = self.slot_tokens[table[row, :seq_len]].tolist()
            assert min(tokens) >= 0, "a position without KV was read"
            seqs.append(tokens)
        if self.fail_when is not None and self.fail_when(batch.forward_mode, seqs):
            raise RuntimeError("injected failure in forward")
        logits = torch.zeros(len(seqs), VOCAB)
        for i, seq in enumerate(seqs):
            logits[i, next_token(seq)] = 10.0
        return LogitsOutput(logits, None)

    # ---- weights and memory, for the control messages ----
    def update_weights_from_disk(self, path: str, load_format=None) -> None:
        if not path.startswith("/good"):
            raise FileNotFoundError(f"no checkpoint at {path}")
        self.weights = path

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        if name != "w":
            raise ValueError(f"unknown weight name {name!r}")
        return [0.5] * truncate_size

    def release_memory_occupation(self) -> ReleasedMemory:
        return ReleasedMemory(kv_bytes=123)

    def resume_memory_occupation(self, released: ReleasedMemory) -> None:
        pass


class Harness:
    """A Scheduler on a FakeRunner, what it sent, and an invariant check after every step."""

    def __init__(self, num_tokens: int = 512, page_size: int = 1, max_running: int = 8, radix: bool = True,
                 **server_args) -> None:
        server_args.setdefault("grammar_backend", "none")
        self.runner = FakeRunner(num_tokens, page_size, max_running, radix=radix)
        self.sent: List[object] = []
        args = ServerArgs(model_path="fake", page_size=page_size, **server_args)
        self.scheduler = Scheduler(args, self.runner, tokenizer=None, eos_token_ids={EOS}, send=self.sent.append)
        self.tokens: Dict[str, List[int]] = defaultdict(list)
        self.finish: Dict[str, dict] = {}
        self.versions: Dict[str, str] = {}  # weight version of each request's last output
        self.steps = 0

    def submit(self, rid: str, prompt: List[int], max_new_tokens: int, stream: bool = False) -> None:
        sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        sp.normalize()
        self.scheduler.dispatch(io.TokenizedGenerateReqInput(rid, list(prompt), sp, stream=stream))

    def control(self, msg) -> List[object]:
        """Dispatch a message; the replies sent for it (by id) so far."""
        self.scheduler.dispatch(msg)
        self.collect()
        return self.replies(msg.request_id) if hasattr(msg, "request_id") else []

    def replies(self, request_id: str) -> List[object]:
        return [m for m in self.sent if getattr(m, "request_id", None) == request_id]

    def step(self) -> None:
        self.scheduler.step()
        self.steps += 1
        self.collect()
        check_kv(self.scheduler)

    def run(self, max_steps: int = 5000, until: Optional[Callable[[], bool]] = None) -> None:
        """Step until idle (or until() holds); bounded, so a bug cannot hang the test."""
        for _ in range(max_steps):
            self.step()
            if until() if until is not None else self.scheduler.is_idle():
                return
        raise AssertionError(f"not done after {max_steps} steps")

    def collect(self) -> None:
        for msg in self.sent:
            if isinstance(msg, io.BatchTokenIDOut):
                for out in msg.outputs:
                    assert out.rid not in self.finish, f"{out.rid} got output after it finished"
                    self.tokens[out.rid] += out.new_token_ids
                    self.versions[out.rid] = out.weight_version
                    if out.finished_reason is not None:
                        self.finish[out.rid] = out.finished_reason
        self.sent[:] = [m for m in self.sent if not isinstance(m, io.BatchTokenIDOut)]


def check_kv(scheduler: Scheduler) -> None:
    """The KV invariant, from the scheduler's own counts and independently from
    the allocator's free pages, the radix tree's nodes and the holders' rows:
    every page is either free or used (never both, never lost)."""
    kv = scheduler.kv_cache_stats()
    assert kv["total_tokens"] == kv["free_tokens"] + kv["in_use_tokens"] + kv["cached_tokens"], kv
    allocator, cache = scheduler.allocator, scheduler.prefix_cache
    P = allocator.page_size
    free = allocator.free_pages.tolist()
    assert len(set(free)) == len(free), "a page is free twice"
    used = set()
    if cache.tree is not None:
        stack = [cache.tree.root]
        while stack:
            node = stack.pop()
            if node.value is not None:
                used.update((node.value // P).tolist())
            stack.extend(node.children.values())
    table = scheduler.pools.req_to_token_pool.req_to_token
    for req in scheduler.kv_holders():
        if req.req_pool_idx is not None:
            used.update((table[req.req_pool_idx, :req.kv_len] // P).tolist())
    assert 0 not in used, "the reserved padding page is in use"
    assert not set(free) & used, "a page is both free and in use"
    assert len(free) + len(used) == allocator.num_pages, "a page leaked"
    assert len(used) * P == kv["in_use_tokens"] + kv["cached_tokens"], (kv, len(used))
