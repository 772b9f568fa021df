"""Constrained decoding in the scheduler: grammars compile on a worker thread
while the request waits aside (others keep running), then each step fills the
allowed-token mask of every constrained row before sampling."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, List

from radixserve.constrained.base import constraint_of
from radixserve.constrained.xgrammar_backend import create_grammar_backend

if TYPE_CHECKING:
    from radixserve.managers.req import Req
    from radixserve.managers.schedule_batch import ScheduleBatch
    from radixserve.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)


class SchedulerGrammarMixin:
    def init_grammar(self: "Scheduler") -> None:
        self.grammar_queue: List["Req"] = []
        self.grammar_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._grammar_backend = None

    @property
    def grammar_backend(self: "Scheduler"):
        """Built on first use: reading the vocabulary takes a moment."""
        if self._grammar_backend is None:
            args = self.server_args
            self._grammar_backend = create_grammar_backend(
                args.grammar_backend, self.tokenizer, self.runner.vocab_size,
                not args.constrained_json_disable_any_whitespace, sorted(self.eos_token_ids))
        return self._grammar_backend

    def needs_grammar(self: "Scheduler", req: "Req") -> bool:
        """Start compiling req's constraint, if it has one; True if it must wait."""
        constraint = constraint_of(req.sampling_params)
        if constraint is None:
            return False
        if self.server_args.grammar_backend == "none":
            raise ValueError("this server runs with --grammar-backend none: constraints are unsupported")
        req.grammar_future = self.grammar_pool.submit(self.grammar_backend.compile, constraint)
        self.grammar_queue.append(req)
        return True

    def move_ready_grammars(self: "Scheduler") -> None:
        """Compiled requests join the waiting queue; failed ones are rejected."""
        still = []
        for req in self.grammar_queue:
            if req.to_abort:
                req.finished_reason = {"type": "abort", "message": "aborted"}
                self.send_outputs([req])
            elif not req.grammar_future.done():
                still.append(req)
            elif req.grammar_future.exception() is not None:
                self.reject(req, 400, str(req.grammar_future.exception()))
            else:
                req.grammar = self.grammar_backend.new_matcher(req.grammar_future.result())
                self.waiting_queue.append(req)
        self.grammar_queue = still

    def set_grammar_mask(self: "Scheduler", batch: "ScheduleBatch") -> None:
        """Fill the allowed-token bitmask of the rows that sample under a grammar."""
        if batch.forward_mode.is_extend():
            rows = [i for i, p in enumerate(batch.plans) if p.completes_prefill and p.req.grammar is not None]
        else:
            rows = [i for i, r in enumerate(batch.reqs) if r.grammar is not None]
        if not rows:
            batch.sampling_info.grammar_mask = None
            return
        bitmask = self.grammar_backend.allocate_bitmask(len(batch.reqs))
        for i in rows:
            batch.reqs[i].grammar.fill_bitmask(bitmask, i)
        batch.sampling_info.grammar_mask = (self.grammar_backend, bitmask, rows)

    @staticmethod
    def advance_grammar(req: "Req", token: int) -> None:
        if req.grammar is not None and not req.grammar.accept_token(token):
            # The mask makes this impossible; if it happens, end the request rather than emit garbage.
            logger.error("request %s: grammar rejected token %d", req.rid, token)
            req.finished_reason = {"type": "abort", "message": "grammar rejected a token"}
