"""Prometheus metrics of the front end (prometheus-client), names prefixed `radixserve:`.

Latencies are measured where the client sees them (the TokenizerManager);
scheduler gauges arrive as SchedulerStats messages."""

from __future__ import annotations

from typing import Any, Dict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from radixserve.managers import io_struct as io

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.replica_stats: Dict[int, io.SchedulerStats] = {}  # the latest from each dp rank
        labels = {"model_name": model_name}
        self.labels = labels

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"radixserve:{name}", doc, list(labels), registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"radixserve:{name}", doc, list(labels), buckets=LATENCY_BUCKETS,
                             registry=self.registry).labels(**labels)

        self.num_running = gauge("num_running_reqs", "Requests running in the scheduler")
        self.num_queued = gauge("num_queue_reqs", "Requests waiting in the scheduler's queue")
        self.token_usage = gauge("token_usage", "Fraction of KV cache tokens in use")
        self.cache_hit_rate = gauge("cache_hit_rate", "Fraction of prompt tokens served from the prefix cache")
        self.gen_throughput = gauge("gen_throughput", "Generation throughput (tokens/s)")
        self.spec_accept_length = gauge("spec_accept_length", "Speculative decoding: mean tokens per verify "
                                                              "step (0 without speculation)")
        tier_label = list(labels) + ["tier"]
        self.hicache_hit_tokens = Gauge("radixserve:hicache_hit_tokens", "Prompt tokens served from each "
                                        "tier of the hierarchical cache (device, host, storage), cumulative",
                                        tier_label, registry=self.registry)
        self.hicache_bytes = Gauge("radixserve:hicache_transfer_bytes", "Bytes the hierarchical cache moved "
                                   "(tier: host_to_device, device_to_host), cumulative",
                                   tier_label, registry=self.registry)
        # Prefill/decode disaggregation (SGLang has the same three under other names)
        self.kv_transfer_bytes = gauge("kv_transfer_bytes", "Bytes of KV (and first tokens) moved between "
                                                            "prefill and decode servers, cumulative")
        self.kv_transfer_failures = gauge("kv_transfer_failures", "Disaggregated requests whose KV transfer "
                                                                  "failed or timed out, cumulative")
        self.num_waiting_for_kv = gauge("num_requests_waiting_for_kv", "Requests waiting for their KV transfer "
                                                                       "(decode) or their decode server (prefill)")
        self.kv_transfer_latency = histogram("kv_transfer_latency_seconds", "Time one request's KV transfer took "
                                                                            "(prefill: the write; decode: from "
                                                                            "asking to having it)")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token")
        self.itl = histogram("inter_token_latency_seconds", "Time between output updates per token")
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency")
        self.queue_time = histogram("queue_time_seconds", "Time from arrival to first prefill")
        self.prompt_tokens = Counter("radixserve:prompt_tokens", "Prompt tokens processed", list(labels),
                                     registry=self.registry).labels(**labels)
        self.generation_tokens = Counter("radixserve:generation_tokens", "Tokens generated", list(labels),
                                         registry=self.registry).labels(**labels)
        self.requests = Counter("radixserve:requests", "Finished requests by finish reason",
                                list(labels) + ["finish_reason"], registry=self.registry)
        self.aborts = Counter("radixserve:aborted_requests",
                              "Aborted requests (by /abort_request, a pause, or their client leaving)", list(labels),
                              registry=self.registry).labels(**labels)
        self.errors = Counter("radixserve:request_errors", "Requests rejected with an error, by HTTP status",
                              list(labels) + ["status"], registry=self.registry)

    def on_output(self, state: Any, out: io.ReqOutput, now: float) -> None:
        """Called for every update of a request (state: the TokenizerManager's ReqState)."""
        new_tokens = len(out.new_token_ids)
        if new_tokens:
            if state.last_output_at is None:
                # The scheduler stamps the first token, so a non-streamed request
                # (one message at the end) still has a true TTFT.
                first = out.first_token_at if out.first_token_at is not None else now
                self.ttft.observe(max(first - state.created, 0.0))
                if out.queue_time is not None:
                    self.queue_time.observe(out.queue_time)
                if new_tokens > 1:  # several tokens in this first message
                    self.itl.observe((now - first) / (new_tokens - 1))
            else:
                self.itl.observe((now - state.last_output_at) / new_tokens)
            state.last_output_at = now
            self.generation_tokens.inc(new_tokens)
        if out.finished_reason is not None:
            reason = out.finished_reason["type"]
            self.e2e.observe(now - state.created)
            self.prompt_tokens.inc(out.prompt_tokens)
            self.requests.labels(**self.labels, finish_reason=reason).inc()
            if reason == "abort":
                self.aborts.inc()

    def on_client_disconnect(self) -> None:
        """A client left before its answer was complete, and its work was aborted.
        Counted here, once per HTTP request: the scheduler's abort message for it
        arrives after the request's state is gone, so on_output never sees it."""
        self.aborts.inc()

    def on_error(self, status: int) -> None:
        self.errors.labels(**self.labels, status=str(status)).inc()

    def on_stats(self, stats: io.SchedulerStats) -> None:
        """Each data-parallel replica reports its own; the gauges describe the
        server: counts and throughput summed, ratios averaged over replicas."""
        self.replica_stats[stats.dp_rank] = stats
        every = list(self.replica_stats.values())
        self.num_running.set(sum(s.num_running_reqs for s in every))
        self.num_queued.set(sum(s.num_queued_reqs for s in every))
        self.token_usage.set(sum(s.token_usage for s in every) / len(every))
        self.cache_hit_rate.set(sum(s.cache_hit_rate for s in every) / len(every))
        self.gen_throughput.set(sum(s.gen_throughput for s in every))
        self._on_transfer_stats([s.disaggregation for s in every if s.disaggregation], stats)
        accept = [s.spec_accept_length for s in every if s.spec_accept_length is not None]
        if accept:
            self.spec_accept_length.set(sum(accept) / len(accept))
        tiers = [s.hicache for s in every if s.hicache]
        if tiers:
            for tier in ("device", "host", "storage"):
                self.hicache_hit_tokens.labels(**self.labels, tier=tier).set(
                    sum(t["hit_tokens"][tier] for t in tiers))
            for direction in ("host_to_device", "device_to_host"):
                self.hicache_bytes.labels(**self.labels, tier=direction).set(
                    sum(t[f"bytes_{direction}"] for t in tiers))

    def _on_transfer_stats(self, every: list, latest: io.SchedulerStats) -> None:
        if not every:
            return
        self.kv_transfer_bytes.set(sum(d["transfer_bytes"] for d in every))
        self.kv_transfer_failures.set(sum(d["num_failed_transfers"] for d in every))
        self.num_waiting_for_kv.set(sum(d["num_waiting_for_kv"] for d in every))
        for seconds in (latest.disaggregation or {}).get("new_transfer_latencies", []):
            self.kv_transfer_latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
