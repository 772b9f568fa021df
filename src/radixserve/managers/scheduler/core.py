"""The Scheduler: receive, dispatch, schedule, launch, process.

It is assembled from parts that own their state: Admission (waiting queue,
policy, prefill budget, chunked request, grammar wait), RunningBatch (decode
preparation, retraction), ResultProcessor (a batch result into outputs),
WeightController (updates, pauses, memory release) and StatsReporter. The
model runner and the output sink are arguments, so the whole loop runs
without a model or sockets in tests (tests/managers); the process entry
(process.py) builds the real ones.

With the overlap schedule (the default) the results of batch N are processed
after batch N+1 is launched, so the CPU's bookkeeping hides behind the GPU's
work. A batch that raises while it is built or run fails only its own
requests (status 500) and frees their KV; see fail_batch.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from radixserve.disaggregation.hooks import make_disaggregation
from radixserve.distributed import get_tp_group
from radixserve.distributed.rank_sync import broadcast_from_first
from radixserve.layers.pooler import EmbeddingOutput, matryoshka_dimensions
from radixserve.layers.sampler import Sampler
from radixserve.lora.spec import LoRASpec
from radixserve.managers import io_struct as io
from radixserve.managers.batch_result import BatchResult
from radixserve.managers.req import Req
from radixserve.managers.schedule_batch import ScheduleBatch, mixed_forward_batch
from radixserve.managers.schedule_policy import NewTokenRatio
from radixserve.managers.scheduler.admission import Admission
from radixserve.managers.scheduler.grammar import GrammarWait
from radixserve.managers.scheduler.outputs import (
    BatchFailed, OutputBuilder, SchedulerStateLost, abort_reason, is_fatal, release_kv)
from radixserve.managers.scheduler.results import ResultProcessor
from radixserve.managers.scheduler.running import RunningBatch
from radixserve.managers.scheduler.server_info import server_info as scheduler_server_info
from radixserve.managers.scheduler.stats import Gauges, StatsReporter
from radixserve.managers.scheduler.weights import WeightController
from radixserve.sampling.sampling_batch_info import SamplingBatchInfo
from radixserve.server_args import ServerArgs
from radixserve.speculative.verify import SpecResult
from radixserve.speculative.worker import make_spec_worker
from radixserve.utils.cpu_malloc import IdleTrim
from radixserve.utils.jit_watch import JitCompileWatch

logger = logging.getLogger(__name__)

# Control messages that see (or change) the requests' state: the in-flight
# batch's results are processed before them, so its requests count as running.
RESOLVE_FIRST = frozenset({
    io.AbortReq, io.GetServerInfoReq, io.FlushCacheReq, io.GetWeightsByNameReq, io.PauseGenerationReq,
    io.ReleaseMemoryOccupationReq, io.UpdateWeightsFromDiskReq, io.UpdateWeightsFromTensorReq,
    io.UpdateWeightsFromDistributedReq, io.UnloadLoRAAdapterReq,
})


class Scheduler:
    def __init__(self, server_args: ServerArgs, runner: Any, tokenizer: Any, eos_token_ids: Set[int],
                 send: Callable[[Any], None]) -> None:
        """runner: a ModelRunner or anything with its pools, sizes and forward();
        send: where every outgoing message goes (the detokenizer's socket)."""
        args = self.server_args = server_args
        self.runner, self.send, self.eos_token_ids = runner, send, eos_token_ids
        self.device, self.pools = runner.device, runner.pools
        self.tp_rank = getattr(runner, "tp_rank", 0)
        self.dp_rank = getattr(runner, "dp_rank", 0)
        self.prefix_cache, self.allocator = runner.pools.prefix_cache, runner.pools.allocator
        self.sampler = Sampler()
        ratio = NewTokenRatio(args.schedule_conservativeness)
        self.grammar = GrammarWait(args.grammar_backend, not args.constrained_json_disable_any_whitespace,
                                   tokenizer, runner.vocab_size, eos_token_ids, agree=broadcast_from_first)
        self.grammar.warm_up(self.device)
        self.admission = Admission(args, self.pools, self.device, runner.max_running_requests,
                                   runner.max_total_num_tokens, self.grammar, ratio, self.dp_rank,
                                   lora=getattr(runner, "lora_manager", None),
                                   pooling=getattr(runner, "pooling", None))
        self.running = RunningBatch(self.pools, self.device, ratio, self.admission.requeue_front)
        self.weights = WeightController(runner, self.prefix_cache, self.device,
                                        self.dp_rank * args.tp_size + self.tp_rank)
        # Speculative decoding (speculative/): drafts verified in one forward per decode step
        self.spec = make_spec_worker(args, runner, eos_token_ids)
        if self.spec is not None:
            self.spec.follow_load(lambda: len(self.running) + len(self.admission.waiting))
        self.outputs = OutputBuilder(args.stream_interval, lambda: self.weights.version, self.spec is not None)
        self.results = ResultProcessor(self.prefix_cache, self.running, self.outputs, eos_token_ids,
                                       runner.context_len, tokenizer)
        self.pd = make_disaggregation(self, get_tp_group().world_size)  # prefill/decode disaggregation
        self.stats = StatsReporter(self.gauges, self.dp_rank, self.prefix_cache.tier_stats,
                                   lambda: self.pd.report(drain=True),
                                   self.spec.mean_accept_length if self.spec is not None else lambda: None)
        self.overlap = not args.disable_overlap_schedule
        self.mixed_chunk = args.enable_mixed_chunk
        self.in_flight: Optional[BatchResult] = None  # launched, results not yet processed
        self.num_overlapped_batches = 0  # launched while the previous one's results were pending
        self.num_failed_batches = 0
        self.num_mixed_batches = 0  # a prefill (chunk) and the running requests' decode step in one forward
        self.was_idle = True
        # (the CPU runner's heap keeps freed memory: utils/cpu_malloc.py)
        self.idle_trim = IdleTrim() if runner.device.type == "cpu" else None
        self.handlers = self.control_table()
        # started by the scheduler process once it serves (process.py)
        self.jit_watch = JitCompileWatch()

    def ready_info(self) -> io.SchedulerReady:
        runner = self.runner
        return io.SchedulerReady(
            max_total_num_tokens=runner.max_total_num_tokens, max_running_requests=runner.max_running_requests,
            context_length=runner.context_len, vocab_size=runner.vocab_size,
            chunked_prefill_size=self.admission.chunk_size, device=str(self.device),
            hidden_size=int(getattr(runner.config, "hidden_size", 0)) if hasattr(runner, "config") else 0,
            matryoshka_dimensions=matryoshka_dimensions(runner.config) if hasattr(runner, "config") else None)

    # ---- the loop ----
    def event_loop(self, receive: Callable[[float], List[Any]]) -> None:
        """receive(timeout_s): the messages that arrived, waiting up to timeout_s for one."""
        while True:
            for msg in receive(self.receive_timeout()):
                self.dispatch(msg)
            self.step()

    def step(self) -> None:
        """One turn: queue compiled requests, apply due updates, then schedule, launch, process."""
        self.emit(self.admission.move_compiled())
        self.pd.step()
        for reply in self.weights.apply_ready(kv_in_use=self.kv_busy()):
            self.send_reply(reply, reply.request_id)
        if self.in_flight is not None and self.must_resolve_before_scheduling():
            self.resolve_in_flight()
        launched = self.schedule_and_launch()
        if launched is not None and self.in_flight is not None:
            self.num_overlapped_batches += 1
        previous, self.in_flight = self.in_flight, launched
        self.process(previous)  # the previous batch's results, while this one runs
        if not self.overlap:
            self.resolve_in_flight()
        if launched is None:
            self.on_idle()
        else:
            self.was_idle = False
            if self.idle_trim is not None:
                self.idle_trim.busy()

    def receive_timeout(self) -> float:
        if self.is_idle() or self.weights.paused:
            return 1.0
        if len(self.grammar) and not self.admission.waiting and self.running.is_empty():
            return 0.005  # only compiling: wait a little, don't spin
        if self.admission.waiting_on_storage() and self.running.is_empty() and self.in_flight is None:
            return 0.002  # only a storage prefetch to wait for: leave its thread the CPU
        if self.pd.has_work() and self.running.is_empty() and self.in_flight is None and not self.admission.has_work():
            return 0.002  # only KV transfers to wait for: leave their threads the CPU
        return 0.0

    def is_idle(self) -> bool:
        return (not self.admission.has_work() and self.running.is_empty() and self.in_flight is None
                and not self.weights.pending and not self.pd.has_work())

    def must_resolve_before_scheduling(self) -> bool:
        """Cases where the next batch depends on the in-flight batch's results.
        An extend batch's requests join the running batch only when its results
        are processed; a grammar's mask needs the last token; rebuilt sampling
        state needs every step counted; finished requests free the memory a
        decode step that does not fit needs."""
        running = self.running
        return (self.in_flight.is_extend
                or isinstance(self.in_flight, SpecResult)  # accepted runs change every request's state
                or (self.spec is not None and not running.is_empty() and self.spec.plan_next_decode(running))
                or (not running.is_empty() and running.batch.sampling_info is None)
                or any(r.grammar is not None for r in running.reqs)
                or not running.decode_fits())

    def resolve_in_flight(self) -> None:
        result, self.in_flight = self.in_flight, None
        self.process(result)

    def process(self, result: Optional[BatchResult]) -> None:
        if result is None:
            return
        try:
            outs = self.results.process(result)
            if isinstance(result, SpecResult):
                self.spec.commit(result)
        except Exception as e:
            # The batch launched after it (if any) stays in flight: it is
            # processed in turn, and skips the requests failed here.
            self.fail_batch(BatchFailed(result.all_reqs(), e), resolve_first=False)
            return
        self.send_outputs(outs)

    # ---- messages ----
    def control_table(self) -> Dict[type, Callable[[Any], Any]]:
        """Message type -> handler; a handler returns its reply, or None."""
        weights, abort_all = self.weights, lambda: self.abort(io.AbortReq(abort_all=True))
        return {
            io.TokenizedGenerateReqInput: self.add_request,
            io.AbortReq: self.abort,
            io.GetServerInfoReq: lambda msg: io.GetServerInfoOut(self.server_info()),
            io.FlushCacheReq: self.flush_cache,
            io.UpdateWeightsFromDiskReq: self.request_weight_update,
            io.UpdateWeightsFromTensorReq: self.request_weight_update,
            io.UpdateWeightsFromDistributedReq: self.request_weight_update,
            io.InitWeightsUpdateGroupReq: weights.init_group,
            io.DestroyWeightsUpdateGroupReq: weights.destroy_group,
            io.ReleaseMemoryOccupationReq: lambda msg: weights.release_memory(self.num_busy()),
            io.ResumeMemoryOccupationReq: weights.resume_memory,
            io.PauseGenerationReq: lambda msg: weights.pause(msg, abort_all),
            io.ContinueGenerationReq: weights.resume_generation,
            io.GetWeightsByNameReq: weights.get_weights_by_name,
            io.LoadLoRAAdapterReq: self.load_lora_adapter,
            io.UnloadLoRAAdapterReq: self.unload_lora_adapter,
        }

    def dispatch(self, msg: Any) -> None:
        handler = self.handlers.get(type(msg))
        if handler is None:
            logger.error("scheduler got an unknown message %r", type(msg))
            return
        if type(msg) in RESOLVE_FIRST:
            self.resolve_in_flight()
        reply = handler(msg)
        if reply is not None:
            self.send_reply(reply, msg.request_id)

    def send_reply(self, reply: io.ControlOut, request_id: str) -> None:
        """The caller waits for its own answer (request_id), folded with the
        other data-parallel replicas' answers (dp_rank)."""
        reply.request_id, reply.dp_rank = request_id, self.dp_rank
        self.send(reply)

    def add_request(self, recv: io.TokenizedGenerateReqInput) -> None:
        try:
            if self.pd.on_arrival(recv):
                return
            refused = self.admission.add(recv)
        except Exception as e:  # one bad request must not take the scheduler down
            bad_input = isinstance(e, ValueError)
            if not bad_input:
                logger.error("request %s failed:\n%s", recv.rid, traceback.format_exc())
            reason = abort_reason(str(e), 400) if bad_input else abort_reason(f"internal error: {e}", 500)
            self.send_outputs([io.ReqOutput(rid=recv.rid, new_token_ids=[], finished_reason=reason,
                                            prompt_tokens=len(recv.input_ids), completion_tokens=0,
                                            cached_tokens=0)])
            return
        if refused is not None:
            self.emit([refused])

    def abort(self, msg: io.AbortReq) -> None:
        def matches(req: Req) -> bool:
            # An n > 1 request's copies share its rid as a prefix.
            return msg.abort_all or req.rid == msg.rid or req.rid.startswith(f"{msg.rid}#")

        ended = self.admission.abort(matches) + self.pd.abort(matches)
        self.running.mark_aborted(matches)
        self.emit(ended + self.reap_aborted())

    def request_weight_update(self, msg: Any) -> Optional[io.UpdateWeightsOut]:
        refusal = self.weights.request_update(msg)
        if refusal is None and msg.abort_all_requests:
            self.abort(io.AbortReq(abort_all=True))
        return refusal

    def load_lora_adapter(self, msg: io.LoadLoRAAdapterReq) -> io.LoRAAdapterOut:
        return self._lora_change(lambda lora: lora.load(
            msg.lora_id, LoRASpec(msg.lora_name, msg.lora_path, msg.pinned)))

    def unload_lora_adapter(self, msg: io.UnloadLoRAAdapterReq) -> io.LoRAAdapterOut:
        """The front end sends it once no request of the adapter is left; its
        cached prefixes stay in their own namespace until evicted."""
        return self._lora_change(lambda lora: lora.unload(msg.lora_id))

    def _lora_change(self, change: Callable[[Any], None]) -> io.LoRAAdapterOut:
        lora = getattr(self.runner, "lora_manager", None)
        if lora is None:
            return io.LoRAAdapterOut(False, "LoRA is not enabled; start the server with --enable-lora")
        try:
            change(lora)
        except ValueError as e:
            return io.LoRAAdapterOut(False, str(e))
        return io.LoRAAdapterOut(True)

    def flush_cache(self, msg: io.FlushCacheReq) -> io.FlushCacheOut:
        if not self.is_idle():
            return io.FlushCacheOut(False, "requests are running or waiting; flush refused")
        self.prefix_cache.reset(flush_storage=msg.flush_storage)
        return io.FlushCacheOut(True, "")

    def num_busy(self) -> int:
        return len(self.kv_holders()) + self.admission.queued()

    def server_info(self) -> Dict[str, Any]:
        return scheduler_server_info(self)

    # ---- scheduling ----
    def schedule_and_launch(self) -> Optional[BatchResult]:
        try:
            extend, decode = self.schedule()
            if extend is not None and decode is not None:
                return self.launch_mixed(decode, extend)
            batch = extend if extend is not None else decode
            return self.launch_batch(batch) if batch is not None else None
        except BatchFailed as failure:
            self.fail_batch(failure)
            return None

    def schedule(self) -> Tuple[Optional[ScheduleBatch], Optional[ScheduleBatch]]:
        """(extend batch, decode batch) of the next forward; at most one of them
        unless mixed chunks are on, when a prefill takes the running requests'
        decode step along."""
        self.emit(self.reap_aborted())
        if self.weights.paused:
            return None, None
        extend = None
        # Between chunks of a long prompt, let running requests decode one step,
        # so a long prompt never stalls them for long (a mixed batch decodes
        # them along with every chunk).
        if self.mixed_chunk or not (self.admission.last_was_chunk and not self.running.is_empty()):
            # While weight updates wait for running requests to drain, admit none.
            extend = self.admission.next_prefill(self.running.reqs, admit_new=not self.weights.pending)
            if extend is not None:
                self.send(self.stats.on_prefill(extend.plans, self.admission.last_admitted))
                if not self.mixed_chunk or self.running.is_empty():
                    return extend, None
        if extend is None:
            self.admission.last_was_chunk = False
            self.retract_chunk_if_decode_needs_room()
        # (with an extend batch the decode step makes room by retracting running
        # requests, never the chunk this very batch continues)
        # (with speculation on, a verify step when the batch qualifies)
        decode, ended = self.running.next_decode() if self.spec is None else self.spec.next_decode(self.running)
        self.emit(ended)
        if decode is not None:
            self.send_stats(self.stats.on_decode(len(decode)))
        return extend, decode

    def retract_chunk_if_decode_needs_room(self) -> None:
        """A half-prefilled (chunked) request's KV is not the running requests'
        to evict: when they cannot grow without it, it goes back to the front
        of the queue (its finished chunks stay in the radix cache), rather than
        a running request being retracted or, alone, cut short."""
        if self.admission.chunked_req is None or self.running.is_empty() or self.running.decode_fits():
            return
        self.resolve_in_flight()  # its last chunk may be in flight: process it first
        req = self.admission.take_chunk()
        if req is not None and not req.finished:
            self.running.retract(req)

    def launch_batch(self, batch: ScheduleBatch) -> BatchResult:
        """Forward and sample: the one call into the model runner. The sampled ids
        stay on the device (the next decode step reads them there) and are
        copied to the host asynchronously."""
        reqs = list(batch.reqs)
        try:
            if self.spec is not None:
                return self.spec.launch(batch, self.sample)
            return self.sample(batch, self.runner.forward(batch.to_forward_batch()))
        except Exception as e:
            raise BatchFailed(reqs, e) from e

    def launch_mixed(self, decode: ScheduleBatch, extend: ScheduleBatch) -> BatchResult:
        """One forward for both; each part is then sampled as if it had run
        alone, and the extend part's result carries the decode part's."""
        reqs = decode.reqs + extend.reqs
        try:
            logits = self.runner.forward(mixed_forward_batch(decode, extend))
            decode_logits, extend_logits = logits.split_mixed(len(decode))
            result = self.sample(extend, extend_logits)
            result.decode_part = self.sample(decode, decode_logits)
        except Exception as e:
            raise BatchFailed(reqs, e) from e
        self.num_mixed_batches += 1
        return result

    def sample(self, batch: ScheduleBatch, logits: Any) -> BatchResult:
        if isinstance(logits, EmbeddingOutput):
            return BatchResult.launched(batch, logits, None)  # an embedding server samples nothing
        if batch.sampling_info is None:
            batch.sampling_info = SamplingBatchInfo.from_reqs(
                batch.reqs, self.runner.vocab_size, self.device, self.eos_token_ids)
        self.grammar.set_mask(batch)
        sample = self.sampler.forward(logits.next_token_logits, batch.sampling_info)
        batch.sampling_info.record(sample.next_token_ids)
        batch.last_token_ids = sample.next_token_ids
        return BatchResult.launched(batch, logits, sample)

    def fail_batch(self, failure: BatchFailed, resolve_first: bool = True) -> None:
        """End the failed batch's requests with a 500 and free their KV; serve on.
        With the overlap schedule the batch before it is still in flight: its
        tokens are delivered first (requests it finishes end normally). If the
        KV does not add up afterwards, the state is unknown: give up."""
        # Under tensor parallelism a batch that failed may have failed on one
        # rank only (or in a collective because a rank died): the ranks are
        # no longer in lockstep, so the server stops rather than serve on.
        if is_fatal(failure.cause) or get_tp_group().world_size > 1:
            raise failure.cause
        logger.error("a batch of %d request(s) failed; ending them and serving on:\n%s", len(failure.reqs),
                     "".join(traceback.format_exception(failure.cause)))
        self.num_failed_batches += 1
        if resolve_first:
            self.resolve_in_flight()
        victims = [r for r in failure.reqs if not r.finished]
        for req in victims:
            req.finished_reason = abort_reason(f"internal error while running the batch: {failure}", 500)
            self.prefix_cache.release(req)
        self.running.remove(victims)
        self.admission.forget(victims)
        self.emit(victims)
        kv = self.kv_cache_stats()
        if kv["total_tokens"] != kv["free_tokens"] + kv["in_use_tokens"] + kv["cached_tokens"]:
            raise SchedulerStateLost(f"KV accounting broken after a failed batch: {kv}") from failure.cause

    def reap_aborted(self) -> List[Req]:
        """Aborted requests that hold KV end now, freeing it at once."""
        ended = self.running.reap_aborted()
        chunk = self.admission.take_aborted_chunk()
        if chunk is not None:
            chunk.finished_reason = abort_reason()
            release_kv(self.prefix_cache, [chunk])
            ended.append(chunk)
        return ended

    # ---- sending ----
    def emit(self, reqs: List[Req]) -> None:
        """Send what is due about these requests."""
        if reqs:
            self.send_outputs(self.outputs.build(reqs))

    def send_outputs(self, outs: List[io.ReqOutput]) -> None:
        if outs:
            self.send(io.BatchTokenIDOut(outs))

    def send_stats(self, msg: Optional[io.SchedulerStats]) -> None:
        if msg is not None:
            self.send(msg)

    # ---- memory ----
    def kv_holders(self) -> List[Req]:
        """Requests holding KV: running, the chunked one, and an in-flight extend batch's."""
        # (the disaggregated ones too, finished or not: their pages wait for a transfer to end)
        holders = list(self.running.reqs) + self.pd.kv_holders()
        extra = [self.admission.chunked_req] if self.admission.chunked_req is not None else []
        if self.in_flight is not None and self.in_flight.is_extend:
            extra += self.in_flight.reqs
        seen = set(map(id, holders))
        for req in extra:
            if id(req) not in seen and not req.finished:
                seen.add(id(req))
                holders.append(req)
        return holders

    def kv_busy(self) -> bool:
        return bool(self.kv_holders()) or self.in_flight is not None

    def kv_cache_stats(self) -> Dict[str, int]:
        """Counted independently: in use = the tree's locked tokens plus what each
        request holds itself; cached = tokens only the tree holds. total = free +
        in_use + cached unless something leaked."""
        cache = self.prefix_cache
        in_use = cache.protected_size() + sum(cache.owned_tokens(r) for r in self.kv_holders())
        return {
            "total_tokens": self.allocator.total_tokens,
            "free_tokens": self.allocator.available_size(),
            "in_use_tokens": in_use,
            "cached_tokens": cache.evictable_size(),
        }

    def gauges(self) -> Gauges:
        kv = self.kv_cache_stats()
        return Gauges(len(self.kv_holders()), len(self.admission.waiting), kv["in_use_tokens"],
                      kv["total_tokens"])

    def on_idle(self) -> None:
        if not self.is_idle():
            return
        if not self.was_idle:  # gauges drop to zero when the work is done
            self.was_idle = True
            self.send(self.stats.message())
        stats = self.kv_cache_stats()
        if stats["total_tokens"] - stats["free_tokens"] - stats["cached_tokens"] or stats["in_use_tokens"]:
            logger.error("KV memory leak while idle: %s", stats)
        if self.idle_trim is not None:
            self.idle_trim.idle()
