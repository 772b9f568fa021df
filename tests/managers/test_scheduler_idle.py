"""An idle CPU scheduler gives its heap's free pages back once per idle period
(utils/cpu_malloc.IdleTrim), never while it has work."""

from __future__ import annotations

from radixserve.utils import cpu_malloc
from tests.managers.scheduler_harness import Harness, reference_output


def test_the_scheduler_trims_once_idle_and_again_only_after_more_work(monkeypatch):
    trims = []
    monkeypatch.setattr(cpu_malloc, "give_back_freed_memory", lambda: trims.append(1) or True)
    now = [0.0]
    h = Harness()
    h.scheduler.idle_trim.clock = lambda: now[0]
    h.submit("a", [5, 6, 7], max_new_tokens=4)
    h.run()
    assert h.tokens["a"] == reference_output([5, 6, 7], 4)
    h.step()
    assert trims == []  # idle, not yet for IDLE_TRIM_S
    now[0] = cpu_malloc.IDLE_TRIM_S
    for _ in range(3):
        h.step()
    assert len(trims) == 1  # once per idle period
    h.submit("b", [8, 9], max_new_tokens=3)
    h.run()
    assert len(trims) == 1  # the clock has not moved since the work
    now[0] += cpu_malloc.IDLE_TRIM_S
    h.step()
    assert len(trims) == 2
