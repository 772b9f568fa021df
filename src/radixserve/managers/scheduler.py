"""The scheduler process: receive requests, pick a batch, run it, send results.

One loop: recv -> schedule -> launch forward + sample -> process results. With
the overlap schedule (the default) the results of batch N are processed after
batch N+1 is launched, so the CPU's bookkeeping hides behind the GPU's work.
It owns the ModelRunner (model and KV memory); batching policy lives in
schedule_policy, batch state in schedule_batch, result bookkeeping in
scheduler_output.
"""

from __future__ import annotations

import logging
import os
import random
import time
import traceback
from typing import List, Optional

import torch
import zmq

from radixserve.layers.sampler import Sampler
from radixserve.managers import io_struct as io
from radixserve.managers.batch_result import BatchResult
from radixserve.managers.ipc import PortArgs, die_with_parent, make_socket
from radixserve.managers.req import Req
from radixserve.managers.schedule_batch import ScheduleBatch
from radixserve.managers.schedule_policy import NewTokenRatio, PrefillAdder, order_waiting_queue
from radixserve.managers.scheduler_grammar import SchedulerGrammarMixin
from radixserve.managers.scheduler_output import SchedulerOutputMixin
from radixserve.managers.scheduler_stats import SchedulerStatsMixin
from radixserve.managers.scheduler_weights import SchedulerWeightsMixin
from radixserve.model_executor.model_runner import ModelRunner
from radixserve.sampling.sampling_batch_info import SamplingBatchInfo
from radixserve.server_args import ServerArgs
from radixserve.utils.hf_utils import get_eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)


class Scheduler(SchedulerOutputMixin, SchedulerStatsMixin, SchedulerGrammarMixin, SchedulerWeightsMixin):
    def __init__(self, server_args: ServerArgs, port_args: PortArgs) -> None:
        self.server_args = server_args
        if server_args.random_seed is not None:
            torch.manual_seed(server_args.random_seed)
        self.seed_rng = random.Random(server_args.random_seed)
        self.runner = ModelRunner(server_args)
        self.device = self.runner.device
        self.pools = self.runner.pools
        self.allocator = self.runner.allocator
        self.prefix_cache = self.pools.prefix_cache
        self.tokenizer = load_tokenizer(self.runner.source, server_args.tokenizer_path)
        self.eos_token_ids = get_eos_token_ids(self.runner.source, self.runner.config, self.tokenizer)
        self.context_len = self.runner.context_len
        self.max_running = self.runner.max_running_requests
        self.chunk_size = server_args.resolved_chunked_prefill_size()
        self.sampler = Sampler()

        self.waiting_queue: List[Req] = []
        self.running_batch = ScheduleBatch([], self.pools, self.device)
        self.chunked_req: Optional[Req] = None
        self.last_was_chunk = False
        self.new_token_ratio = NewTokenRatio(server_args.schedule_conservativeness)
        self.num_retractions = 0
        self.num_prefill_tokens = 0  # tokens actually computed by prefill (after cache hits)
        self.init_stats()
        self.init_grammar()
        self.init_weights()
        self.was_idle = True
        self.overlap = not server_args.disable_overlap_schedule
        self.in_flight: Optional[BatchResult] = None  # launched, results not yet processed
        self.num_overlapped_batches = 0  # launched while the previous one's results were pending

        ctx = zmq.Context(2)
        self.recv_sock = make_socket(ctx, zmq.PULL, port_args.tokenizer_to_scheduler, bind=True)
        self.send_sock = make_socket(ctx, zmq.PUSH, port_args.scheduler_to_detokenizer, bind=False)
        self.poller = zmq.Poller()
        self.poller.register(self.recv_sock, zmq.POLLIN)

    def ready_info(self) -> io.SchedulerReady:
        return io.SchedulerReady(
            max_total_num_tokens=self.runner.max_total_num_tokens,
            max_running_requests=self.max_running,
            context_length=self.context_len,
            vocab_size=self.runner.vocab_size,
            chunked_prefill_size=self.chunk_size,
            device=str(self.device),
        )

    # ---- the loop ----
    def event_loop(self) -> None:
        while True:
            for msg in self.recv_requests(block=self.is_idle() or self.paused):
                self.process_input(msg)
            if self.grammar_queue:
                self.move_ready_grammars()
            if self.pending_update is not None:
                self.maybe_apply_weight_update()
            if self.in_flight is not None and self.must_resolve_before_scheduling():
                self.resolve_in_flight()
            batch = self.get_next_batch_to_run()
            launched = self.launch_batch(batch) if batch is not None else None
            if launched is not None and self.in_flight is not None:
                self.num_overlapped_batches += 1
            self.resolve_in_flight()  # the previous batch's results, while this one runs
            self.in_flight = launched
            if not self.overlap:
                self.resolve_in_flight()
            if batch is None:
                self.on_idle()
            else:
                self.was_idle = False

    def is_idle(self) -> bool:
        return (not self.waiting_queue and self.running_batch.is_empty() and self.chunked_req is None
                and not self.grammar_queue and self.in_flight is None and self.pending_update is None)

    def must_resolve_before_scheduling(self) -> bool:
        """Cases where the next batch depends on the in-flight batch's tokens.
        An extend batch's requests join the running batch only when its results
        are processed; a grammar's mask needs the last token; rebuilt sampling
        state needs every step counted."""
        running = self.running_batch
        return (self.in_flight.is_extend
                or (not running.is_empty() and running.sampling_info is None)
                or any(r.grammar is not None for r in running.reqs))

    def resolve_in_flight(self) -> None:
        result, self.in_flight = self.in_flight, None
        if result is not None:
            self.process_batch_result(result)

    def recv_requests(self, block: bool) -> list:
        msgs = []
        if block:
            self.poller.poll(timeout=1000)
        elif self.grammar_queue and not self.waiting_queue and self.running_batch.is_empty():
            self.poller.poll(timeout=5)  # only compiling: wait a little, don't spin
        while True:
            try:
                msgs.append(self.recv_sock.recv_pyobj(zmq.NOBLOCK))
            except zmq.Again:
                return msgs

    def process_input(self, msg) -> None:
        if isinstance(msg, io.TokenizedGenerateReqInput):
            try:
                self.add_request(msg)
            except Exception as e:  # one bad request must not take the scheduler down
                bad_input = isinstance(e, ValueError)
                if not bad_input:
                    logger.error("request %s failed:\n%s", msg.rid, traceback.format_exc())
                self.send_sock.send_pyobj(io.BatchTokenIDOut([io.ReqOutput(
                    rid=msg.rid, new_token_ids=[], prompt_tokens=len(msg.input_ids), completion_tokens=0,
                    cached_tokens=0, finished_reason={"type": "abort", "message": str(e) if bad_input
                                                      else f"internal error: {e}",
                                                      "status_code": 400 if bad_input else 500})]))
        elif isinstance(msg, io.AbortReq):
            self.resolve_in_flight()  # its requests may be the ones to abort
            self.abort(msg)
        elif isinstance(msg, io.GetServerInfoReq):
            self.resolve_in_flight()  # so the KV counts add up
            self.send_sock.send_pyobj(io.GetServerInfoOut(self.server_info()))
        elif isinstance(msg, io.FlushCacheReq):
            self.resolve_in_flight()
            self.send_sock.send_pyobj(self.flush_cache())
        elif isinstance(msg, (io.UpdateWeightsFromDiskReq, io.UpdateWeightsFromTensorReq,
                              io.UpdateWeightsFromDistributedReq)):
            self.request_weight_update(msg)
        elif isinstance(msg, io.InitWeightsUpdateGroupReq):
            self.init_weights_update_group(msg)
        elif isinstance(msg, io.DestroyWeightsUpdateGroupReq):
            self.destroy_weights_update_group(msg)
        elif isinstance(msg, io.ReleaseMemoryOccupationReq):
            self.release_memory_occupation()
        elif isinstance(msg, io.ResumeMemoryOccupationReq):
            self.resume_memory_occupation()
        elif isinstance(msg, io.PauseGenerationReq):
            self.pause_generation(msg)
        elif isinstance(msg, io.ContinueGenerationReq):
            self.continue_generation()
        elif isinstance(msg, io.GetWeightsByNameReq):
            self.resolve_in_flight()
            self.get_weights_by_name(msg)
        else:
            logger.error("scheduler got an unknown message %r", type(msg))

    def add_request(self, recv: io.TokenizedGenerateReqInput) -> None:
        seed = recv.sampling_params.sampling_seed
        if seed is None:
            seed = self.seed_rng.getrandbits(62)
        req = Req(recv, seed)
        limit = self.server_args.max_queued_requests
        if len(req.origin_input_ids) + 1 > self.runner.max_total_num_tokens:
            # It could never fit; fail it now instead of queueing it forever.
            self.reject(req, 400, f"the prompt has {len(req.origin_input_ids)} tokens and can never fit "
                        f"the KV cache ({self.runner.max_total_num_tokens} tokens)")
        elif limit is not None and len(self.waiting_queue) + len(self.grammar_queue) >= limit:
            self.reject(req, 503, f"the server is overloaded: {limit} requests are already queued")
        elif not self.needs_grammar(req):
            self.waiting_queue.append(req)

    def reject(self, req: Req, status_code: int, message: str) -> None:
        req.finished_reason = {"type": "abort", "message": message, "status_code": status_code}
        self.send_outputs([req])

    # ---- batch selection ----
    def get_next_batch_to_run(self) -> Optional[ScheduleBatch]:
        self.reap_aborted()
        if self.paused:
            return None
        # Between chunks of a long prompt, let running requests decode one step,
        # so a long prompt never stalls them for long.
        if not (self.last_was_chunk and not self.running_batch.is_empty()):
            batch = self.get_new_prefill_batch()
            if batch is not None:
                return batch
        self.last_was_chunk = False
        if self.running_batch.is_empty():
            return None
        return self.update_running_batch()

    def get_new_prefill_batch(self) -> Optional[ScheduleBatch]:
        if not self.waiting_queue and self.chunked_req is None:
            return None
        running = self.running_batch.reqs
        self.waiting_queue = order_waiting_queue(
            self.waiting_queue, self.server_args.schedule_policy, self.prefix_cache
        )
        adder = PrefillAdder(
            self.allocator.available_size() + self.prefix_cache.evictable_size(), running,
            self.new_token_ratio.value, self.allocator.page_size, self.chunk_size,
            self.server_args.max_prefill_tokens, lock=self.prefix_cache.lock,
        )
        if self.chunked_req is not None:
            adder.add(self.chunked_req)
            if not adder.plans:
                # It cannot continue this round (memory is short): start nothing
                # ahead of it, or a new chunked request would take its place and
                # orphan it with its KV and locks. Decoding frees memory meanwhile.
                return None
        # While a weight update waits for running requests to drain, admit none.
        for req in ([] if self.pending_update is not None else self.waiting_queue):
            if len(running) + len(adder.plans) >= self.max_running:
                break
            self.prefix_cache.match(req)
            if not adder.add(req):
                break
        admitted = [p.req for p in adder.plans if p.req is not self.chunked_req]
        if not adder.plans:
            return None
        batch = ScheduleBatch([p.req for p in adder.plans], self.pools, self.device)
        if not batch.prepare_for_extend(adder.plans):
            for req in admitted:
                self.prefix_cache.release(req)
            return None
        for req in admitted:
            if req.cached_tokens is None:  # first admission: prompt tokens served from cache
                req.cached_tokens = min(req.prefix_len, len(req.origin_input_ids))
                req.queue_time = time.monotonic() - req.created_at
        self.waiting_queue = self.waiting_queue[len(admitted):]
        self.num_prefill_tokens += sum(p.extend_len for p in adder.plans)
        self.log_prefill(adder.plans, admitted)
        self.chunked_req = adder.new_chunked_req
        self.last_was_chunk = self.chunked_req is not None
        return batch

    def update_running_batch(self) -> Optional[ScheduleBatch]:
        batch = self.running_batch
        while not self.prefix_cache.make_room(batch.decode_tokens_needed()):
            if self.in_flight is not None:
                # Its finished requests free memory; retract only what is still short.
                self.resolve_in_flight()
                if batch.is_empty():
                    return None
                continue
            if len(batch) == 1:
                # One request has the whole pool: it cannot grow; end it.
                req = batch.reqs[0]
                req.finished_reason = {"type": "length", "length": len(req.output_ids)}
                self.finish_requests([req])
                batch.filter([])
                return None
            self.retract_last(batch)
        self.new_token_ratio.step()
        batch.prepare_for_decode()
        self.log_decode(len(batch))
        return batch

    def retract_last(self, batch: ScheduleBatch) -> None:
        """Free the newest request's KV and requeue it at the front; it will
        prefill its prompt and output so far again and carry on."""
        req = batch.reqs[-1]
        batch.filter(list(range(len(batch) - 1)))
        self.prefix_cache.release(req)
        req.reset_for_retract()
        self.waiting_queue.insert(0, req)
        self.new_token_ratio.on_retract()
        self.num_retractions += 1
        logger.info("KV cache full: retracted request %s (%d tokens)", req.rid, req.seq_len)

    # ---- running ----
    def launch_batch(self, batch: ScheduleBatch) -> BatchResult:
        """Forward and sample; the sampled ids stay on the device (the next
        decode step reads them there) and are copied to the host asynchronously."""
        logits = self.runner.forward(batch.to_forward_batch())
        if batch.sampling_info is None:
            batch.sampling_info = SamplingBatchInfo.from_reqs(
                batch.reqs, self.runner.vocab_size, self.device, self.eos_token_ids
            )
        self.set_grammar_mask(batch)
        sample = self.sampler.forward(logits.next_token_logits, batch.sampling_info)
        batch.sampling_info.record(sample.next_token_ids)
        batch.last_token_ids = sample.next_token_ids
        return BatchResult.launched(batch, logits, sample)

    # ---- memory ----
    def kv_holders(self) -> List[Req]:
        holders = list(self.running_batch.reqs)
        if self.chunked_req is not None:
            holders.append(self.chunked_req)
        return holders

    def kv_cache_stats(self) -> dict:
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

    def on_idle(self) -> None:
        if not self.is_idle():
            return
        if not self.was_idle:  # gauges drop to zero when the work is done
            self.was_idle = True
            self.send_stats()
        self.check_memory_when_idle()

    def check_memory_when_idle(self) -> None:
        stats = self.kv_cache_stats()
        leaked = stats["total_tokens"] - stats["free_tokens"] - stats["cached_tokens"]
        if leaked or stats["in_use_tokens"]:
            logger.error("KV memory leak while idle: %s", stats)

    # ---- control ----
    def server_info(self) -> dict:
        return {
            "max_total_num_tokens": self.runner.max_total_num_tokens,
            "max_running_requests": self.max_running,
            "context_length": self.context_len,
            "chunked_prefill_size": self.chunk_size,
            "page_size": self.allocator.page_size,
            "num_running_reqs": len(self.kv_holders()),
            "num_waiting_reqs": len(self.waiting_queue),
            "num_retractions": self.num_retractions,
            "num_overlapped_batches": self.num_overlapped_batches,
            "num_prefill_tokens": self.num_prefill_tokens,
            "num_evictions": self.prefix_cache.tree.num_evicted_nodes if self.prefix_cache.tree else 0,
            "weight_version": self.weight_version,
            "paused": self.paused,
            "kv_cache": self.kv_cache_stats(),
            "device": str(self.device),
            "dtype": str(self.runner.dtype).removeprefix("torch."),
        }

    def flush_cache(self) -> io.FlushCacheOut:
        if not self.is_idle():
            return io.FlushCacheOut(False, "requests are running or waiting; flush refused")
        self.prefix_cache.reset()
        return io.FlushCacheOut(True, "")


def run_scheduler_process(
    server_args: ServerArgs, port_args: PortArgs, ready_pipe, parent_pid: int
) -> None:
    die_with_parent(parent_pid)
    logging.basicConfig(
        level=server_args.log_level.upper(),
        format="[%(asctime)s scheduler] %(levelname)s %(message)s",
    )
    try:
        scheduler = Scheduler(server_args, port_args)
    except Exception as e:  # report start-up failures to the parent, then exit
        ready_pipe.send(("error", f"{type(e).__name__}: {e}"))
        logger.error("scheduler failed to start:\n%s", traceback.format_exc())
        os._exit(1)
    ready_pipe.send(("ready", scheduler.ready_info()))
    try:
        scheduler.event_loop()
    except Exception:
        logger.error("scheduler crashed:\n%s", traceback.format_exc())
        os._exit(1)
