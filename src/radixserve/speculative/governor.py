"""Whether speculation pays, judged from the decode steps the server actually ran.

A verify cycle (drafts, then one target forward over them) costs more than a
plain decode step; it pays only while the tokens it keeps per request
outweigh that. How much more depends on the machine: on a 2-core CPU a cycle
of the default model with an EAGLE-3 head cost about 1.4 plain steps, on an
H200 about 40 (eager forwards against one CUDA-graph replay). So the governor
measures both modes, per batch-size bucket: seconds per emitted token per
request, a moving average over the steps of each mode. It speculates while
that is cheaper than plain decoding (a mode's cost: its moving average of step seconds
over its moving average of tokens per request, not an average of per-step
ratios, which overstates speculation: a verify keeps 1 to 4 tokens, and the
mean of 1/n exceeded 1/mean(n) by a quarter at an accept length of 1.7,
enough to turn off a head that gained 9%), and now and then it runs `probe_steps`
of the other mode, because the accept length changes with the text and costs
change with the batch's lengths: every `recheck_every` eligible steps, or
less often when the other mode is so much dearer that probing it would lose
more than `probe_share` of the time (on the H200 a verify cycle cost 40 plain
steps).

Outputs never depend on it: a verify step emits exactly the tokens plain
decoding would have."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

# Of the newest step in a mode's moving average. A verify keeps 1 to 4 tokens
# (about 1.1 tokens' spread at an accept length of 2.3), so an average over a
# handful of steps swings by a fifth: at 0.25 the default model's head, 1.5x
# faster than plain steps on the held-out questions, lost to them on a few
# unlucky verifies and then stayed off until the next probe (1.3x overall).
# About 32 steps' memory keeps the swing near 6%.
EMA_WEIGHT = 1 / 32
# A bucket's first estimate of a mode it has not run, scaled from the nearest
# measured bucket, is trusted without an early probe only when it is at least
# this many times the winner's (an H200's eager verify at 40 plain steps).
PRIOR_TRUSTED_RATIO = 2.0
BUCKET_EDGES = (1, 2, 4, 8, 16, 32)  # batch sizes sharing a decision: 1, 2, 3-4, 5-8, ...
# A verdict for speculation is borrowed only from a bucket at most this many
# buckets away. From farther, speculation is estimated at FAR_SPECULATION_RATIO
# x plain steps' cost until measured: the bucket starts on plain steps (not on
# a tie that timing noise would flip) and probes speculation after the wait
# for that ratio (80 steps by default). A verify's rows grow with the batch, so
# its cost against a plain step's changes with it: on a CPU without AMX a verify
# of 5-8 requests (20-32 rows) leaves the few-row kernels for the dense copy,
# and draining batches of 16 that borrowed batch 1's verdict there decoded at
# 0.72-0.89x of plain decoding; with this rule 0.97-1.18x in one session and
# 0.76-1.08x in the next, where engines of one configuration already differed
# by up to 8% from start to start (docs/benchmarks.md).
BORROW_SPECULATION_BUCKETS = 1
FAR_SPECULATION_RATIO = 1.05
# Speculation that lost to plain steps by less than this is probed again after at
# most plain_recheck steps; dearer, after the loss-based wait (a probe of a mode 1.5x
# dearer every 128 steps would cost 10% of the time). At batch 1 on a 2-core Zen 4 it
# lost by 1.0-1.2x on hard answers and won by 1.1-1.4x on the others.
NEAR_TIE_RATIO = 1.25


def bucket_of(batch_size: int) -> int:
    for edge in BUCKET_EDGES:
        if batch_size <= edge:
            return edge
    return BUCKET_EDGES[-1] * 2


def _bucket_index(bucket: int) -> int:
    """A bucket's place in BUCKET_EDGES (the last bucket, past them, one after)."""
    return BUCKET_EDGES.index(bucket) if bucket in BUCKET_EDGES else len(BUCKET_EDGES)


@dataclass
class BucketState:
    # Per mode: moving averages of (step seconds, tokens per request); its cost is their ratio.
    averages: Dict[bool, Optional[Tuple[float, float]]] = field(default_factory=lambda: {True: None, False: None})
    probe_mode: Optional[bool] = None  # the mode being measured, if a probe runs
    probe_left: int = 0
    since_probe: int = 0
    # Samples in each mode's average since it was (re)started: the first n
    # weigh 1/n each (a plain mean), so a probe's estimate is its steps' mean.
    # 0 restarts it: a probe's first sample replaces the old average (it is the news).
    samples: Dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    # Speculation's cost / plain's in the nearest measured bucket: a new bucket
    # starts in the mode that won there and estimates the other from its own
    # first samples, rather than probing both (a draining batch passes through
    # every bucket; first probes in each cost more than they tell).
    prior: Optional[float] = None

    @property
    def cost(self) -> Dict[bool, Optional[float]]:
        """Seconds per emitted token per request of each mode (None: not measured yet)."""
        return {mode: None if avg is None else avg[0] / avg[1] for mode, avg in self.averages.items()}

    def choose(self, limits: "SpecGovernor") -> bool:
        """This step's mode; `limits` holds the probe lengths and how often to recheck."""
        cost = self.cost
        unmeasured = cost[True] is None and cost[False] is None
        if unmeasured and self.prior is not None:
            return self.prior < 1
        for mode in (True, False):  # measure speculation first, then plain steps
            if cost[mode] is None and self.probe_mode is None:
                self.start_probe(mode, limits.first_probe_steps)
        if self.probe_mode is not None:
            mode = self.probe_mode
            self.probe_left -= 1
            if self.probe_left <= 0:
                self.probe_mode = None
            return mode
        best = cost[True] < cost[False]
        self.since_probe += 1
        # A probe of the losing mode loses probe_steps x (its cost / the winner's - 1) winner
        # steps; waiting long enough keeps that loss to about probe_share of the time. Two
        # modes near a tie are probed often: a probe costs little, and which one wins
        # flips with the text (a hard question made plain steps win for a while, and the
        # next easy one then decoded plainly until the probe: 1.29x against 1.43x).
        ratio = cost[not best] / max(cost[best], 1e-12)
        wait = max(limits.recheck_every, limits.probe_steps * (ratio - 1) / limits.probe_share)
        if best and self.samples[not best] == 0 and ratio < PRIOR_TRUSTED_RATIO:
            # Plain steps' cost is another bucket's ratio, not a measurement: costs scale
            # differently with the batch (on a CPU speculation won at batch 1 and cost 1.5x
            # plain steps at batch 4, 2x on one without AMX), so a close call for
            # speculation is checked soon: a draining batch lives in each bucket for a
            # few dozen steps (with a check after 64, batches of 16 lost 13% in three of
            # four runs on a Zen 4 CPU). A plain probe costs little (plain steps are never
            # worse than plain decoding). A borrowed call for plain steps is not checked early: probes of
            # speculation at 2x its price cost 10-20% of short batch-4 and batch-8 runs there.
            wait = limits.borrowed_recheck
        if not best and ratio < NEAR_TIE_RATIO:
            # Speculation lost, by a little: its cost moves with the text (the held-out
            # questions' accept lengths run from 1.8 to 6), so a verdict measured on a hard
            # answer must not keep the next, easier ones plain for hundreds of steps (a
            # 2-core Zen 4 at batch 1 decoded a third of its tokens plainly that way:
            # 1.03x over plain decoding, against 1.17x with speculation always on).
            wait = min(wait, limits.plain_recheck)
        if self.since_probe >= wait:
            self.start_probe(not best, limits.probe_steps)
        return best

    def start_probe(self, mode: bool, steps: int) -> None:
        self.probe_mode, self.probe_left, self.since_probe = mode, steps, 0
        self.samples[mode] = 0

    def record(self, mode: bool, seconds: float, tokens: float) -> None:
        self.samples[mode] += 1
        old = self.averages[mode]
        if self.samples[mode] == 1:  # a new or restarted average
            self.averages[mode] = (seconds, tokens)
        else:
            weight = max(EMA_WEIGHT, 1 / self.samples[mode])
            self.averages[mode] = ((1 - weight) * old[0] + weight * seconds, (1 - weight) * old[1] + weight * tokens)
        if self.prior is not None and self.averages[not mode] is None:  # the other mode, by the prior's ratio
            seconds, tokens = self.averages[mode]
            # (its sample count stays 0: its first probe's first step replaces the estimate)
            self.averages[not mode] = (seconds / self.prior if mode else seconds * self.prior, tokens)
        self.prior = None


@dataclass
class SpecGovernor:
    # The first probe of each mode is longer: the first verify steps of a
    # server's first answers accepted no draft of a head that accepted 1 in 5 later on.
    first_probe_steps: int = 64
    probe_steps: int = 32
    recheck_every: int = 64  # eligible steps between probes of the other mode, at least
    borrowed_recheck: int = 16  # steps before plain steps are probed in a bucket that speculates on another's verdict
    plain_recheck: int = 128  # at most this many plain steps before speculation that lost by a little is probed again
    probe_share: float = 0.02  # and long enough that probes lose about this share of the time
    clock: Callable[[], float] = time.perf_counter
    buckets: Dict[int, BucketState] = field(default_factory=dict)
    # The step being timed: (bucket, speculated, started at); its cost is
    # known when the next decode step starts (its results are processed by then).
    _open: Optional[tuple] = None
    _last_mode: Dict[int, bool] = field(default_factory=dict)

    def choose(self, batch_size: int) -> bool:
        """Whether a speculation-eligible decode step of this size speculates."""
        bucket = bucket_of(batch_size)
        state = self.buckets.get(bucket)
        if state is None:
            state = self.buckets[bucket] = BucketState(prior=self.nearest_ratio(bucket))
        return state.choose(self)

    def nearest_ratio(self, bucket: int) -> Optional[float]:
        """Speculation's cost / plain's in the nearest bucket that measured both,
        at least FAR_SPECULATION_RATIO from a far one (BORROW_SPECULATION_BUCKETS)."""
        known = [(abs(_bucket_index(b) - _bucket_index(bucket)), b)
                 for b, s in self.buckets.items() if None not in s.cost.values()]
        if not known:
            return None
        distance, nearest = min(known)
        cost = self.buckets[nearest].cost
        ratio = cost[True] / max(cost[False], 1e-12)
        return ratio if distance <= BORROW_SPECULATION_BUCKETS else max(ratio, FAR_SPECULATION_RATIO)

    def step_started(self, batch_size: int, speculated: bool) -> None:
        self._open = (bucket_of(batch_size), speculated, self.clock())

    def step_finished(self, tokens_per_request: float) -> None:
        """The open step's tokens are known: record its cost, unless it was the
        first step after a change of mode (an EAGLE head after plain CUDA-graph
        steps lacks their features, and drafts nothing at first)."""
        if self._open is None:
            return
        bucket, mode, started = self._open
        self._open = None
        changed = self._last_mode.get(bucket) != mode
        self._last_mode[bucket] = mode
        if changed or tokens_per_request <= 0:
            return
        self.buckets.setdefault(bucket, BucketState()).record(mode, self.clock() - started, tokens_per_request)

    def interrupt(self) -> None:
        """Something other than the open step ran (a prefill): its time is not the step's."""
        self._open = None

    def info(self) -> dict:
        """Per bucket: the measured seconds per token per request of each mode."""
        return {str(b): {"speculate_s_per_token": s.cost[True], "plain_s_per_token": s.cost[False]}
                for b, s in sorted(self.buckets.items())}
