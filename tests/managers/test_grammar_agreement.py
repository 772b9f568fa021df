"""With tensor parallelism each rank compiles grammars at its own pace, but a
constrained request leaves the grammar wait at the step rank 0 says: the
`agree` hook returns rank 0's list of finished compiles, and every rank follows
it (waiting for its own compile when it is behind)."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

from radixserve.managers.scheduler.grammar import GrammarWait


@dataclass
class WaitingReq:
    """The fields of a Req that the grammar wait reads and writes."""

    grammar_future: Future = field(default_factory=Future)
    to_abort: bool = False
    finished_reason: Optional[dict] = None
    grammar: Any = None


def grammar_wait(agree) -> GrammarWait:
    return GrammarWait("none", True, tokenizer=None, vocab_size=8, eos_token_ids={0}, agree=agree)


def test_a_compile_done_here_waits_for_rank_0():
    wait = grammar_wait(agree=lambda done: [])  # rank 0: nothing is done yet
    req = WaitingReq()
    req.grammar_future.set_exception(ValueError("bad regex"))
    wait.queue.append(req)
    assert wait.collect() == ([], [])
    assert wait.queue == [req] and req.finished_reason is None


def test_a_rank_behind_rank_0_waits_for_its_own_compile():
    req, seen = WaitingReq(), []

    def rank_0_says_done(done: list) -> list:
        seen.append(done)
        # This rank's compile finishes only after it was asked, on another thread.
        threading.Thread(target=req.grammar_future.set_exception, args=(ValueError("bad regex"),)).start()
        return [0]

    wait = grammar_wait(agree=rank_0_says_done)
    wait.queue.append(req)
    ready, ended = wait.collect()
    assert seen == [[]]  # this rank had not finished when it was asked
    assert ready == [] and ended == [req] and wait.queue == []
    assert req.finished_reason["status_code"] == 400 and "bad regex" in req.finished_reason["message"]


def test_aborted_requests_end_at_rank_0s_step():
    wait = grammar_wait(agree=lambda done: done)
    kept, aborted = WaitingReq(), WaitingReq(to_abort=True)
    wait.queue += [kept, aborted]
    assert wait.collect() == ([], [aborted])
    assert wait.queue == [kept] and aborted.finished_reason["type"] == "abort"
    assert grammar_wait(agree=lambda done: done).collect() == ([], [])  # an empty wait asks nobody
