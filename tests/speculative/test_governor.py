"""The speculation governor's decisions from measured step times (a fake clock):
it measures speculation first, then plain steps, keeps the cheaper mode per
batch-size bucket, re-probes the other one, and ignores the first step after a
change of mode and steps a prefill interrupted."""

from __future__ import annotations

from radixserve.speculative.governor import SpecGovernor, bucket_of


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(gov: SpecGovernor, clock: Clock, steps: int, batch: int, cost: dict) -> list:
    """`steps` eligible decode steps; cost[mode] = (seconds, tokens per request),
    the tokens a number or a function of the step's index."""
    modes = []
    for step in range(steps):
        mode = gov.choose(batch)
        gov.step_started(batch, mode)
        seconds, tokens = cost[mode]
        clock.now += seconds
        gov.step_finished(tokens(step) if callable(tokens) else tokens)
        modes.append(mode)
    return modes


def test_keeps_the_cheaper_mode_and_rechecks():
    clock = Clock()
    gov = SpecGovernor(first_probe_steps=4, probe_steps=4, recheck_every=10, probe_share=1.0, clock=clock)
    # speculation: 0.03 s per cycle for 1.5 tokens (0.02 s/token); plain: 0.01 s per token
    slow_spec = {True: (0.03, 1.5), False: (0.01, 1.0)}
    modes = run(gov, clock, 8 + 10 + 4, 1, slow_spec)
    assert modes[:4] == [True] * 4 and modes[4:8] == [False] * 4  # the two probes
    assert modes[8:18] == [False] * 10  # plain is cheaper
    assert modes[18:22] == [True] * 4  # the recheck probes speculation again
    info = gov.info()["1"]
    assert abs(info["speculate_s_per_token"] - 0.02) < 1e-9 and abs(info["plain_s_per_token"] - 0.01) < 1e-9
    # the text turns repetitive: speculation now keeps 3.5 tokens per cycle (0.0086 s/token)
    fast_spec = {True: (0.03, 3.5), False: (0.01, 1.0)}
    modes = run(gov, clock, 30, 1, fast_spec)
    first_probe = modes.index(True)  # the next recheck: its first sample replaces the old average
    assert first_probe <= 10 and modes[first_probe:first_probe + 14] == [True] * 14


def test_buckets_decide_apart_starting_from_the_nearest_one():
    clock = Clock()
    gov = SpecGovernor(first_probe_steps=3, probe_steps=3, recheck_every=20, probe_share=1.0, clock=clock)
    run(gov, clock, 6, 1, {True: (0.01, 3.0), False: (0.01, 1.0)})  # batch 1: speculation wins
    # batch 2 (the next bucket) starts speculating (batch 1's verdict), without a first probe
    modes = run(gov, clock, 30, 2, {True: (0.05, 1.2), False: (0.01, 1.0)})
    assert modes[0] is True
    # ... its own samples and batch 1's ratio (1/3) make plain look dearer (0.125 s/token) until
    # the recheck measures plain steps (0.01): then plain wins there
    assert modes[-5:] == [False] * 5
    assert gov.choose(1) is True and gov.choose(2) is False
    assert bucket_of(1) == 1 and bucket_of(3) == bucket_of(4) == 4 and bucket_of(8) == 8


def test_a_far_bucket_does_not_borrow_a_verdict_for_speculation():
    """Speculation wins at batch 1; batch 5-8, three buckets away, starts on
    plain steps all the same (speculation estimated 5% dearer) and probes
    speculation after recheck_every steps (the loss-based wait is shorter here),
    where it keeps it if it wins there too."""
    clock = Clock()
    gov = SpecGovernor(first_probe_steps=3, probe_steps=3, recheck_every=20, probe_share=1.0, clock=clock)
    run(gov, clock, 6, 1, {True: (0.01, 3.0), False: (0.01, 1.0)})
    modes = run(gov, clock, 30, 8, {True: (0.02, 3.0), False: (0.01, 1.0)})
    switched = modes.index(True)
    assert 20 <= switched <= 23 and modes[switched:] == [True] * (30 - switched)
    # a verdict for plain steps is borrowed from any distance (staying plain never loses)
    gov = SpecGovernor(first_probe_steps=3, probe_steps=3, recheck_every=20, probe_share=1.0, clock=clock)
    run(gov, clock, 6, 1, {True: (0.03, 1.5), False: (0.01, 1.0)})
    assert run(gov, clock, 5, 8, {True: (0.01, 3.0), False: (0.01, 1.0)}) == [False] * 5


def test_first_step_after_a_change_and_interrupted_steps_are_not_counted():
    clock = Clock()
    gov = SpecGovernor(first_probe_steps=2, probe_steps=2, recheck_every=100, probe_share=1.0, clock=clock)
    gov.step_started(1, True)
    clock.now += 5.0  # the first verify step after plain steps: not a fair sample
    gov.step_finished(1.0)
    assert gov.info() == {}
    gov.step_started(1, True)
    clock.now += 0.02
    gov.interrupt()  # a prefill ran before this step's results were counted
    clock.now += 7.0
    gov.step_finished(2.0)
    assert gov.info() == {}
    gov.step_started(1, True)
    clock.now += 0.02
    gov.step_finished(2.0)
    assert abs(gov.info()["1"]["speculate_s_per_token"] - 0.01) < 1e-12


def test_a_much_dearer_mode_is_probed_rarely():
    """Speculation at 40x a plain step's cost (an eager verify cycle against a CUDA-graph
    replay): probes of it wait until they lose about probe_share of the time."""
    clock = Clock()
    gov = SpecGovernor(first_probe_steps=4, probe_steps=4, recheck_every=10, probe_share=0.05, clock=clock)
    modes = run(gov, clock, 8 + 2000, 1, {True: (0.04, 1.0), False: (0.001, 1.0)})
    # after the two first probes: plain until 4 x (40 - 1) / 0.05 = 3,120 steps have passed
    assert modes[8:] == [False] * 2000


def test_cost_is_seconds_over_tokens_not_a_mean_of_per_step_ratios():
    """Verify steps keep 1 to 4 tokens: speculation at 0.014 s a cycle keeping 1 and 3
    tokens by turns costs 0.007 s a token (28 ms / 4 tokens), cheaper than plain steps
    at 0.008; the mean of the steps' own ratios (0.0093) would have called it dearer."""
    clock = Clock()
    gov = SpecGovernor(first_probe_steps=8, probe_steps=8, recheck_every=100, probe_share=1.0, clock=clock)
    modes = run(gov, clock, 60, 1, {True: (0.014, lambda step: (1.0, 3.0)[step % 2]), False: (0.008, 1.0)})
    assert modes[16:] == [True] * 44
    info = gov.info()["1"]
    assert abs(info["speculate_s_per_token"] - 0.007) < 1e-3 and abs(info["plain_s_per_token"] - 0.008) < 1e-9


def test_a_run_of_unlucky_verifies_does_not_turn_a_winning_head_off():
    """Verify steps keep 1 to 4 tokens: a head at 2.25 tokens a 9.4 ms cycle
    (4.2 ms a token) beats 7 ms plain steps, though eight verifies in a row may
    keep one token each (9.4 ms a token). The average spans enough steps that
    such a run does not switch to plain steps (which would then last until the
    next probe)."""
    clock = Clock()
    gov = SpecGovernor(first_probe_steps=32, probe_steps=8, recheck_every=10_000, probe_share=1.0, clock=clock)
    modes = run(gov, clock, 400, 1, {True: (0.0094, lambda step: 1.0 if step % 16 < 8 else 3.5), False: (0.007, 1.0)})
    assert modes[:32] == [True] * 32 and modes[32:64] == [False] * 32  # the first probes
    assert modes[64:] == [True] * 336


def test_modes_near_a_tie_are_probed_often():
    """A hard question makes plain steps win by 5%: a probe of speculation then
    loses little (8 steps x 5%), so it comes after max(recheck_every, 8 x 0.05 /
    probe_share) = 20 steps, and the next, easy question speculates again at once
    rather than after hundreds of plain steps."""
    clock = Clock()
    gov = SpecGovernor(first_probe_steps=8, probe_steps=8, recheck_every=16, probe_share=0.02, clock=clock)
    modes = run(gov, clock, 100, 1, {True: (0.0105, 1.0), False: (0.01, 1.0)})
    assert modes[:8] == [True] * 8 and modes[16:].count(False) > modes[16:].count(True)
    modes = run(gov, clock, 60, 1, {True: (0.0105, 3.0), False: (0.01, 1.0)})
    resumed = modes.index(True)
    assert resumed <= 21 and modes[resumed:] == [True] * (60 - resumed)


def test_a_close_verdict_borrowed_from_another_bucket_is_checked_soon():
    """Speculation wins narrowly at batch 1, so batch 2 starts speculating on
    that verdict; there it costs 2.5x plain steps. Its estimate of plain steps
    is borrowed (batch 1's ratio), so plain steps are probed after
    borrowed_recheck steps, not after recheck_every nor the loss-based wait
    (8 x 0.1 / 0.02 = 40)."""
    clock = Clock()
    gov = SpecGovernor(first_probe_steps=8, probe_steps=8, recheck_every=32, borrowed_recheck=6,
                       probe_share=0.02, clock=clock)
    run(gov, clock, 40, 1, {True: (0.02, 2.2), False: (0.01, 1.0)})  # 0.0091 against 0.01 s a token
    modes = run(gov, clock, 60, 2, {True: (0.06, 2.0), False: (0.012, 1.0)})
    switched = modes.index(False)
    assert 6 <= switched <= 10 and modes[switched:] == [False] * (60 - switched)  # measured: plain wins here


def test_a_borrowed_verdict_for_plain_steps_waits_as_a_measured_one():
    """Plain steps win at batch 1 (speculation 1.3x their cost), so batch 4
    starts on plain steps; speculation, there at 2x, is first probed after the
    loss-based wait (8 x 0.3 / 0.02 = 120 steps), not after recheck_every:
    staying on plain steps never costs more than plain decoding."""
    clock = Clock()
    gov = SpecGovernor(first_probe_steps=8, probe_steps=8, recheck_every=16, probe_share=0.02, clock=clock)
    run(gov, clock, 40, 1, {True: (0.026, 2.0), False: (0.01, 1.0)})  # 0.013 against 0.01 s a token
    modes = run(gov, clock, 200, 4, {True: (0.048, 2.0), False: (0.012, 1.0)})
    first_probe = modes.index(True)
    assert 115 <= first_probe <= 125 and modes[:first_probe] == [False] * first_probe


def test_the_cpu_speculates_only_batches_whose_verify_stays_on_the_fused_layers():
    """verify_batch_limit: where the CPU's fused decode layers run, the largest
    batch whose verify rows (requests x tokens a request) they take, within the
    flag's limit; the flag alone elsewhere (no fused layers: CUDA, other models)."""
    from types import SimpleNamespace

    from radixserve.model_executor.cpu_decode_layers import CpuDecodeLayers
    from radixserve.speculative.worker import verify_batch_limit

    under_20 = SimpleNamespace(cpu_decode_layers=SimpleNamespace(takes_decode_rows=lambda rows: rows < 20))
    assert verify_batch_limit(8, under_20, 4) == 4
    assert verify_batch_limit(3, under_20, 4) == 3
    assert verify_batch_limit(8, under_20, 8) == 2
    assert verify_batch_limit(8, under_20, 32) == 8  # none fits: the flag (the governor still measures)
    assert verify_batch_limit(8, SimpleNamespace(cpu_decode_layers=None), 4) == 8
    this_cpu = SimpleNamespace(cpu_decode_layers=CpuDecodeLayers)
    assert all(CpuDecodeLayers.takes_decode_rows(b * 4) for b in range(1, verify_batch_limit(8, this_cpu, 4) + 1))


def test_speculation_that_lost_a_little_is_probed_again_soon():
    """A hard answer makes speculation a little dearer than plain steps; the
    loss-based wait (probe_steps x (ratio - 1) / probe_share) would keep the
    next, easier text plain for long, so speculation is probed again after
    plain_recheck steps. Speculation dearer by NEAR_TIE_RATIO or more keeps the long wait."""
    clock = Clock()
    gov = SpecGovernor(first_probe_steps=4, probe_steps=4, recheck_every=10, plain_recheck=20, probe_share=0.02,
                       clock=clock)
    hard = {True: (0.024, 2.0), False: (0.01, 1.0)}  # speculation 1.2x dearer: a wait of 40 by the loss rule
    modes = run(gov, clock, 8, 1, hard)
    assert modes == [True] * 4 + [False] * 4
    easy = {True: (0.026, 4.0), False: (0.01, 1.0)}  # the text turns easy: speculation 1.5x cheaper
    modes = run(gov, clock, 40, 1, easy)
    first_probe = modes.index(True)
    assert first_probe <= 21 and modes[first_probe:first_probe + 15] == [True] * 15
    gov = SpecGovernor(first_probe_steps=4, probe_steps=4, recheck_every=10, plain_recheck=20, probe_share=0.02,
                       clock=clock)
    run(gov, clock, 8, 1, {True: (0.03, 2.0), False: (0.01, 1.0)})  # 1.5x dearer: wait 4 x 0.5 / 0.02 = 100
    assert run(gov, clock, 90, 1, easy) == [False] * 90
