"""The scheduler's periodic log lines (SGLang's format) and the stats it sends
to the front end for /metrics."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, List

from radixserve.managers import io_struct as io

if TYPE_CHECKING:
    from radixserve.managers.req import Req
    from radixserve.managers.schedule_batch import ExtendPlan
    from radixserve.managers.scheduler import Scheduler

logger = logging.getLogger("radixserve.scheduler")

DECODE_LOG_INTERVAL = 40  # decode steps between two "Decode batch" lines


class SchedulerStatsMixin:
    def init_stats(self: "Scheduler") -> None:
        self.stat_prompt_tokens = 0  # admitted prompt tokens, for the cache hit rate
        self.stat_cached_tokens = 0
        self.stat_decode_steps = 0
        self.stat_gen_tokens = 0  # since the last decode line
        self.stat_last_decode_log = time.monotonic()
        self.stat_gen_throughput = 0.0

    def token_usage(self: "Scheduler") -> float:
        kv = self.kv_cache_stats()
        return kv["in_use_tokens"] / max(kv["total_tokens"], 1)

    def log_prefill(self: "Scheduler", plans: List["ExtendPlan"], admitted: List["Req"]) -> None:
        """admitted: the requests that joined from the queue (their cached prefix counts)."""
        cached = sum(r.prefix_len for r in admitted)
        self.stat_prompt_tokens += sum(p.extend_len for p in plans) + cached
        self.stat_cached_tokens += cached
        logger.info(
            "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
            "#running-req: %d, #queue-req: %d",
            len(admitted), sum(p.extend_len for p in plans), cached, self.token_usage(),
            len(self.running_batch), len(self.waiting_queue),
        )
        self.send_stats()

    def log_decode(self: "Scheduler", batch_size: int) -> None:
        self.stat_decode_steps += 1
        self.stat_gen_tokens += batch_size
        if self.stat_decode_steps % DECODE_LOG_INTERVAL:
            return
        now = time.monotonic()
        self.stat_gen_throughput = self.stat_gen_tokens / max(now - self.stat_last_decode_log, 1e-6)
        self.stat_gen_tokens, self.stat_last_decode_log = 0, now
        logger.info(
            "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, gen throughput (token/s): %.2f, "
            "#queue-req: %d",
            len(self.running_batch), self.kv_cache_stats()["in_use_tokens"], self.token_usage(),
            self.stat_gen_throughput, len(self.waiting_queue),
        )
        self.send_stats()

    def send_stats(self: "Scheduler") -> None:
        self.send_sock.send_pyobj(io.SchedulerStats(
            num_running_reqs=len(self.kv_holders()),
            num_queued_reqs=len(self.waiting_queue),
            token_usage=self.token_usage(),
            cache_hit_rate=self.stat_cached_tokens / max(self.stat_prompt_tokens, 1),
            gen_throughput=self.stat_gen_throughput,
        ))
