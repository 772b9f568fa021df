"""Stats: the scheduler's periodic log lines (SGLang's format) and the gauges it
sends to the front end for /metrics (returned as messages; the loop sends them)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

from radixserve.managers import io_struct as io
from radixserve.managers.req import Req
from radixserve.managers.schedule_batch import ExtendPlan

logger = logging.getLogger("radixserve.scheduler")

DECODE_LOG_INTERVAL = 40  # decode steps between two "Decode batch" lines


@dataclass
class Gauges:
    num_running_reqs: int
    num_queued_reqs: int
    in_use_tokens: int
    total_tokens: int

    @property
    def token_usage(self) -> float:
        return self.in_use_tokens / max(self.total_tokens, 1)


class StatsReporter:
    def __init__(self, gauges: Callable[[], Gauges], dp_rank: int = 0,
                 tier_stats: Callable[[], Optional[dict]] = lambda: None,
                 transfer_stats: Callable[[], Optional[dict]] = lambda: None,
                 spec_accept_length: Callable[[], Optional[float]] = lambda: None) -> None:
        self.gauges = gauges
        self.transfer_stats = transfer_stats  # prefill/decode disaggregation's counters, or None
        self.spec_accept_length = spec_accept_length
        self.tier_stats = tier_stats  # the hierarchical cache's counters, or None
        self.dp_rank = dp_rank
        self.prompt_tokens = 0  # admitted prompt tokens, for the cache hit rate
        self.cached_tokens = 0
        self.decode_steps = 0
        self.gen_tokens = 0  # since the last decode line
        self.last_decode_log = time.monotonic()
        self.gen_throughput = 0.0

    def on_prefill(self, plans: List[ExtendPlan], admitted: List[Req]) -> io.SchedulerStats:
        """admitted: the requests that joined from the queue (their cached prefix counts)."""
        cached = sum(r.prefix_len for r in admitted)
        new_tokens = sum(p.extend_len for p in plans)
        self.prompt_tokens += new_tokens + cached
        self.cached_tokens += cached
        g = self.gauges()
        logger.info(
            "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
            "#running-req: %d, #queue-req: %d",
            len(admitted), new_tokens, cached, g.token_usage, g.num_running_reqs, g.num_queued_reqs,
        )
        return self.message(g)

    def on_decode(self, batch_size: int) -> Optional[io.SchedulerStats]:
        self.decode_steps += 1
        self.gen_tokens += batch_size
        if self.decode_steps % DECODE_LOG_INTERVAL:
            return None
        now = time.monotonic()
        self.gen_throughput = self.gen_tokens / max(now - self.last_decode_log, 1e-6)
        self.gen_tokens, self.last_decode_log = 0, now
        g = self.gauges()
        logger.info(
            "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, gen throughput (token/s): %.2f, "
            "#queue-req: %d",
            g.num_running_reqs, g.in_use_tokens, g.token_usage, self.gen_throughput, g.num_queued_reqs,
        )
        return self.message(g)

    def message(self, g: Optional[Gauges] = None) -> io.SchedulerStats:
        g = g or self.gauges()
        return io.SchedulerStats(
            num_running_reqs=g.num_running_reqs,
            num_queued_reqs=g.num_queued_reqs,
            token_usage=g.token_usage,
            cache_hit_rate=self.cached_tokens / max(self.prompt_tokens, 1),
            gen_throughput=self.gen_throughput,
            dp_rank=self.dp_rank,
            hicache=self.tier_stats(),
            disaggregation=self.transfer_stats(),
            spec_accept_length=self.spec_accept_length(),
        )
