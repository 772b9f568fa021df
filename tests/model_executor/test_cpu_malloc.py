"""keep_freed_memory: freed large CPU tensors stay in the heap for reuse
instead of going back to the kernel and page-faulting in again. Measured as
the process's minor page faults (not time), in fresh interpreters."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# A prefill's MLPs, shaped like the default model's over 4,096 tokens (float32:
# 9 to 50 MB a tensor); the page faults of rounds after the first three.
MLP_ROUNDS = """
import resource, sys, torch
from radixserve.utils.cpu_malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x, w_gate_up, w_down = torch.ones(4096, 576), torch.ones(3072, 576), torch.ones(576, 1536)
counted = 0
for round in range(10):
    before = faults()
    for layer in range(4):
        gate_up = (x * 0.5) @ w_gate_up.t()
        act = torch.nn.functional.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
        del gate_up
        x = x + act @ w_down.t()
        del act
    counted += faults() - before if round >= 3 else 0
print(counted)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", MLP_ROUNDS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


# 4 KB pages the counted rounds allocate: 7 rounds x 4 layers x (9.4 MB scaled input,
# 50 MB gate|up, 25 MB activation, 9.4 MB down output, 9.4 MB sum)
ALLOCATED_PAGES = 7 * 4 * (103 << 20) // 4096


def test_freed_tensors_are_reused_without_page_faults():
    kept = faults("keep")
    # glibc's default gives memory back and faults it in again (16,096 to 515,676 seen). Two
    # runs: one full-suite run on a 2-core VM saw 3,840 once, a default that kept its pages
    # (the machine's doing, not ours: the same script gave 268,521-370,982 alone).
    default = max(faults("default"), faults("default"))
    # Nearly every page is reused: 0 to 12,288 faults seen (at most 1.7% of the pages the
    # rounds allocate; other threads' arenas may fault some, in steps of 3,072).
    assert kept < ALLOCATED_PAGES // 20, (kept, default)
    assert default > 2 * kept, (kept, default)


# 256 MB touched, freed into the kept heap, then given back: RSS in MB at each point.
GIVE_BACK = """
import torch
from radixserve.utils.cpu_malloc import give_back_freed_memory, keep_freed_memory
assert keep_freed_memory()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
before = rss()
big = torch.ones(64 << 20)
held = rss()
del big
kept = rss()
assert give_back_freed_memory()
print(before, held, kept, rss())
"""


def test_freed_memory_goes_back_to_the_kernel_when_asked():
    out = subprocess.run([sys.executable, "-c", GIVE_BACK], capture_output=True, text=True, check=True)
    before, held, kept, given_back = map(int, out.stdout.split()[-4:])
    assert held - before >= 250  # the tensor's pages are resident
    assert kept - before >= 250  # freed, they stay in the heap (keep_freed_memory)
    assert kept - given_back >= 250, (before, held, kept, given_back)


def test_an_idle_scheduler_gives_memory_back_once_per_idle_period(monkeypatch):
    from radixserve.utils import cpu_malloc

    trims = []
    monkeypatch.setattr(cpu_malloc, "give_back_freed_memory", lambda: trims.append(1) or True)
    now = [100.0]
    policy = cpu_malloc.IdleTrim(after_s=5.0, clock=lambda: now[0])

    def idle_at(t: float) -> bool:
        now[0] = t
        return policy.idle()

    assert [idle_at(t) for t in (100.0, 104.9)] == [False, False]
    assert idle_at(105.0) and len(trims) == 1
    assert not idle_at(500.0) and len(trims) == 1  # once per idle period
    policy.busy()
    assert [idle_at(t) for t in (600.0, 603.0, 605.5, 606.0)] == [False, False, True, False]
    assert len(trims) == 2
