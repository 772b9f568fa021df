"""The grammar wait: constrained requests wait here while their grammar
compiles on a worker thread (others keep running), then join the waiting
queue; each step fills the allowed-token mask of every constrained row."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Set, Tuple

import torch

from radixserve.constrained.base import constraint_of
from radixserve.managers.req import Req
from radixserve.managers.schedule_batch import ScheduleBatch
from radixserve.managers.scheduler.outputs import abort_reason

logger = logging.getLogger(__name__)


class GrammarWait:
    def __init__(self, backend_name: str, any_whitespace: bool, tokenizer: Any, vocab_size: int,
                 eos_token_ids: Set[int], agree: Optional[Callable[[Any], Any]] = None) -> None:
        """agree(value) -> rank 0's value: with tensor parallelism every rank
        compiles on its own thread, at its own pace, but rank 0 decides which
        compiles count as done, so all ranks queue a request at the same step."""
        self.backend_name, self.vocab_size = backend_name, vocab_size
        self.agree = agree or (lambda value: value)
        self.queue: List[Req] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._backend_args = (backend_name, tokenizer, vocab_size, any_whitespace, sorted(eos_token_ids))
        self._backend = None

    def warm_up(self, device: torch.device) -> None:
        """On a GPU, compile the mask kernel before serving (kernel_warmup.py says why)."""
        if device.type == "cuda" and self.backend_name == "xgrammar":
            from radixserve.constrained.xgrammar_backend import warm_up_bitmask_kernel

            warm_up_bitmask_kernel(device, self.vocab_size)

    def __len__(self) -> int:
        return len(self.queue)

    @property
    def backend(self):
        """Built on first use: reading the vocabulary takes a moment, and
        importing xgrammar would lengthen every start-up for servers that may
        never see a constrained request."""
        if self._backend is None:
            from radixserve.constrained.xgrammar_backend import create_grammar_backend

            self._backend = create_grammar_backend(*self._backend_args)
        return self._backend

    def submit(self, req: Req) -> bool:
        """Start compiling req's constraint, if it has one; True if it must wait here."""
        constraint = constraint_of(req.sampling_params)
        if constraint is None:
            return False
        if self.backend_name == "none":
            raise ValueError("this server runs with --grammar-backend none: constraints are unsupported")
        req.grammar_future = self.pool.submit(self.backend.compile, constraint)
        self.queue.append(req)
        return True

    def abort(self, matches: Callable[[Req], bool]) -> None:
        for req in self.queue:
            req.to_abort = req.to_abort or matches(req)  # ended when its compile finishes

    def collect(self) -> Tuple[List[Req], List[Req]]:
        """(compiled requests, ready to queue; requests ended: aborted or failed to compile)."""
        ready, ended, still = [], [], []
        if not self.queue:  # (the same on every rank: no agreement needed)
            return ready, ended
        done = set(self.agree([i for i, r in enumerate(self.queue) if r.to_abort or r.grammar_future.done()]))
        for i, req in enumerate(self.queue):
            if i not in done:
                still.append(req)
            elif req.to_abort:
                req.finished_reason = abort_reason()
                ended.append(req)
            elif req.grammar_future.exception() is not None:  # (waits, on a rank behind rank 0)
                req.finished_reason = abort_reason(str(req.grammar_future.exception()), 400)
                ended.append(req)
            else:
                req.grammar = self.backend.new_matcher(req.grammar_future.result())
                ready.append(req)
        self.queue = still
        return ready, ended

    def set_mask(self, batch: ScheduleBatch) -> None:
        """Fill the allowed-token bitmask of the rows that sample under a grammar."""
        if batch.forward_mode.is_extend():
            rows = [i for i, p in enumerate(batch.plans) if p.completes_prefill and p.req.grammar is not None]
        else:
            rows = [i for i, r in enumerate(batch.reqs) if r.grammar is not None]
        if not rows:
            batch.sampling_info.grammar_mask = None
            return
        bitmask = self.backend.allocate_bitmask(len(batch.reqs))
        for i in rows:
            batch.reqs[i].grammar.fill_bitmask(bitmask, i)
        batch.sampling_info.grammar_mask = (self.backend, bitmask, rows)

    @staticmethod
    def advance(req: Req, token: int) -> None:
        if req.grammar is not None and not req.grammar.accept_token(token):
            # The mask makes this impossible; if it happens, end the request rather than emit garbage.
            logger.error("request %s: grammar rejected token %d", req.rid, token)
            req.finished_reason = abort_reason("grammar rejected a token")
