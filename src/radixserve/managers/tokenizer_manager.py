"""TokenizerManager: the front end in the caller's process (asyncio).

Validates and tokenizes requests, sends them to the scheduler, and turns the
detokenizer's messages back into result dicts. The Engine and the HTTP server
share it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple, TypeVar

import zmq
import zmq.asyncio

from radixserve.constrained.base import constraint_of
from radixserve.constrained.xgrammar_backend import create_grammar_backend
from radixserve.managers import io_struct as io
from radixserve.managers.data_parallel import ReplicaDispatcher, merge_replies
from radixserve.managers.generate_input import GenerateReqInput, RequestRejected, SingleRequest
from radixserve.managers.metrics import Metrics
from radixserve.managers.request_output import OutputBuilder, ReqState
from radixserve.managers.ipc import PortArgs, make_socket
from radixserve.managers.validation import FieldError
from radixserve.lora.registry import LoRARef, LoRARegistry
from radixserve.lora.spec import parse_lora_paths
from radixserve.multimodal.processor import add_images, image_processor_for
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)
T = TypeVar("T")
# Threads for tokenizer work (encode, chat templates). Two, so one huge prompt
# does not hold up everyone else's; HF fast tokenizers encode concurrently
# and release the GIL while they do.
TOKENIZER_THREADS = 2
# One prompt of at most this many characters or token ids (and no image) is
# checked and tokenized on the event loop: a fraction of a millisecond, less
# than handing it to a tokenizer thread and waking the loop again.
INLINE_PROMPT_LIMIT = 2048


@dataclass
class PreparedGenerate:
    """A generate call checked and tokenized, ready to send: prepare() builds it
    once and generate_request() takes it, so an HTTP route can answer 400
    before a stream starts without tokenizing the prompt twice. Use once."""

    obj: GenerateReqInput
    states: List[ReqState]


class TokenizerManager:
    def __init__(self, server_args: ServerArgs, port_args: PortArgs, tokenizer: Any,
                 ready: io.SchedulerReady) -> None:
        self.server_args = server_args
        self.tokenizer = tokenizer
        self.ready = ready
        self.context_len = ready.context_length
        self.vocab_size = ready.vocab_size
        self.port_args = port_args
        self.states: Dict[str, ReqState] = {}
        # With --dp-size N, which replica serves each request (and each one's load).
        self.dispatcher = ReplicaDispatcher(server_args.dp_size, server_args.load_balance_method)
        # control request_id -> its caller's future, and the replies in so far (one per replica)
        self._replies: Dict[str, Tuple[asyncio.Future, List[io.ControlOut]]] = {}
        self._started = False
        self._dead: Optional[str] = None
        self.metrics: Optional[Metrics] = None
        self._grammar_checker = None
        self.outputs = OutputBuilder(tokenizer, server_args.incremental_streaming_output)
        self._tokenizer_pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="radixserve-tokenizer")
        if server_args.enable_metrics:
            self.metrics = Metrics(server_args.served_model_name or server_args.model_path)
        self.lora = LoRARegistry(parse_lora_paths(server_args.lora_paths)) if server_args.enable_lora else None
        self.image_processor = image_processor_for(server_args.model_path, tokenizer)  # None: text only

    # ---- lifecycle: sockets are bound to the loop that first uses them ----
    def _ensure_started(self) -> None:
        if self._started:
            return
        ctx = zmq.asyncio.Context(2)
        self.replica_socks = [make_socket(ctx, zmq.PUSH, self.port_args.scheduler_input(dp_rank), bind=False)
                              for dp_rank in range(self.dispatcher.dp_size)]
        self.recv_sock = make_socket(ctx, zmq.PULL, self.port_args.detokenizer_to_tokenizer, bind=True)
        self._recv_task = asyncio.get_running_loop().create_task(self._handle_loop())
        self._started = True

    async def close(self) -> None:
        if self._started:
            self._recv_task.cancel()
            for sock in self.replica_socks:
                sock.close()
            self.recv_sock.close()
            self._started = False
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    def fail_all(self, message: str) -> None:
        """A child process died: end every pending request with an error."""
        self._dead = message
        for state in self.states.values():
            state.pending.append(io.ReqOutput(
                rid=state.req.rid, new_token_ids=[],
                finished_reason={"type": "abort", "message": message, "status_code": 503},
                prompt_tokens=len(state.prompt_ids), completion_tokens=len(state.output_ids), cached_tokens=0,
            ))
            state.event.set()
        self.dispatcher.clear()
        for fut, _ in self._replies.values():
            if not fut.done():
                fut.set_exception(RuntimeError(message))

    @property
    def is_dead(self) -> bool:
        """A child process died: nothing more can be served."""
        return self._dead is not None

    @property
    def dead_reason(self) -> Optional[str]:
        return self._dead

    # ---- generate ----
    async def generate_request(self, obj: GenerateReqInput,
                               prepared: Optional[PreparedGenerate] = None) -> AsyncIterator[Dict[str, Any]]:
        """Yields result dicts: for stream=True one per update (with 'index' for a
        batch), else one per single request in the order of obj.split().
        `prepared`: what prepare(obj) returned, to skip checking obj again."""
        self._ensure_started()
        if self._dead:
            raise RuntimeError(self._dead)
        if prepared is None:
            prepared = await self.prepare(obj)
        states = prepared.states
        # No await from this check to the registration below: two requests
        # racing for one rid cannot both pass.
        for state in states:
            if state.req.rid in self.states:
                raise FieldError("rid", f"rid {state.req.rid!r} is already in flight")
        # (an adapter unloaded since prepare() is refused here, before anything is sent)
        lora_ids = [self.lora_id_of(state.req) for state in states]
        if self.lora is not None:
            self.lora.acquire(lora_ids)
        for state, lora_id in zip(states, lora_ids):
            self.states[state.req.rid] = state
            replica = self.dispatcher.assign(state.req.rid, len(state.prompt_ids), state.req.routed_dp_rank)
            self.replica_socks[replica].send_pyobj(io.TokenizedGenerateReqInput(
                rid=state.req.rid, input_ids=state.prompt_ids, sampling_params=state.req.sampling_params,
                stream=state.req.stream, return_logprob=state.req.return_logprob,
                logprob_start_len=state.req.logprob_start_len, top_logprobs_num=state.req.top_logprobs_num,
                lora_id=lora_id, mm_inputs=state.req.mm_inputs, bootstrap=state.req.bootstrap,
            ))
        try:
            if obj.stream:
                async for chunk in self._stream(states, tag_index=obj.is_batch or len(states) > 1):
                    yield chunk
            else:
                for state in states:
                    result = None
                    async for result in self._wait(state):
                        pass
                    yield result
        finally:
            for state in states:
                if not state.finished:  # the caller went away: stop the work
                    self.abort_request(state.req.rid)
                self.states.pop(state.req.rid, None)
            if self.lora is not None:
                self.lora.release(lora_ids)

    async def _wait(self, state: ReqState) -> AsyncIterator[Dict[str, Any]]:
        while True:
            await state.event.wait()
            state.event.clear()
            while state.pending:
                out = state.pending.popleft()
                _raise_if_rejected(out)
                yield self.outputs.apply(state, out)
            if state.finished:
                return

    async def _stream(self, states: List[ReqState], tag_index: bool) -> AsyncIterator[Dict[str, Any]]:
        if len(states) == 1 and not tag_index:
            # One request, the usual stream: its outputs directly, without a
            # pump task and a queue (two more task switches a token).
            async for chunk in self._wait(states[0]):
                yield chunk
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(state: ReqState) -> None:
            async for chunk in self._wait(state):
                if tag_index:
                    chunk["index"] = state.req.index
                await queue.put(chunk)
            await queue.put(None)

        tasks = [asyncio.ensure_future(pump(s)) for s in states]
        try:
            remaining = len(states)
            while remaining:
                chunk = await queue.get()
                if chunk is None:
                    remaining -= 1
                else:
                    yield chunk
        finally:
            for t in tasks:
                t.cancel()

    async def prepare(self, obj: GenerateReqInput, embedding: bool = False) -> PreparedGenerate:
        """Check and tokenize everything without sending anything; bad input is a
        ValueError (FieldError naming the field). The work that grows with the
        request (checking ids, tokenizing) runs off the event loop. embedding:
        an embedding call (managers/embedding_input.py), the one kind of
        request an --is-embedding server takes."""
        if self.server_args.is_embedding and not embedding:
            raise FieldError("model", "this server serves embeddings (--is-embedding): use /v1/embeddings "
                                      "or /encode (Engine.encode), not generate or completions")
        if is_short_single(obj):  # the hop to a tokenizer thread and back costs more than this work
            checked = self._split_and_tokenize(obj)
        else:
            checked = await self.run_in_tokenizer(self._split_and_tokenize, obj)
        states = [ReqState(req=single, prompt_ids=ids, created=time.monotonic()) for single, ids in checked]
        await self._check_constraints([single for single, _ in checked])
        return PreparedGenerate(obj, states)

    def _split_and_tokenize(self, obj: GenerateReqInput) -> List[Tuple[SingleRequest, List[int]]]:
        """In a tokenizer thread: every single request with its checked prompt ids
        (all checked before any is sent). The n copies of a prompt share one encode."""
        args = self.server_args
        singles = obj.split(args.max_batch_prompts, args.max_n, self.vocab_size, args.dp_size)
        encoded: Dict[str, List[int]] = {}
        checked = []
        for single in singles:
            if single.input_ids is not None:
                ids = single.input_ids
            else:
                if single.prompt not in encoded:
                    encoded[single.prompt] = self.tokenizer.encode(single.prompt)
                ids = list(encoded[single.prompt])
            self._check_tokens(single, ids)
            ids, single.mm_inputs = add_images(self.image_processor, ids, single.image_data, self.context_len)
            self.lora_id_of(single)
            checked.append((single, ids))
        return checked

    def lora_id_of(self, req: SingleRequest) -> Optional[int]:
        """The id of the adapter the request names; FieldError("lora_path") if unknown."""
        if req.lora_path is None:
            return None
        if self.lora is None:
            raise FieldError("lora_path", "lora_path needs a server started with --enable-lora (or --lora-paths)")
        return self.lora.resolve(req.lora_path)

    async def run_in_tokenizer(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run CPU-bound tokenizer work (encode, decode, chat templates) in the
        tokenizer threads, so the event loop keeps serving other clients."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, call)

    async def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return await self.run_in_tokenizer(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def _check_constraints(self, singles: List[SingleRequest]) -> None:
        """At most one constraint per request, and it must compile (cached by text)."""
        for single in singles:
            try:
                constraint = constraint_of(single.sampling_params)
            except ValueError as e:
                raise FieldError("json_schema", str(e)) from None
            if constraint is None:
                continue
            if self.server_args.grammar_backend == "none":
                raise FieldError(constraint.kind, "constraints need a grammar backend; "
                                                  "this server runs with --grammar-backend none")
            if self._grammar_checker is None:
                self._grammar_checker = create_grammar_backend(
                    self.server_args.grammar_backend, self.tokenizer, self.vocab_size,
                    not self.server_args.constrained_json_disable_any_whitespace, [])
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._grammar_checker.compile, constraint)
            except ValueError as e:
                raise FieldError(constraint.kind, str(e)) from None

    def _check_tokens(self, req: SingleRequest, ids: List[int]) -> None:
        field = "prompt" if req.input_ids is None else "input_ids"
        if not ids:
            raise FieldError(field, "'prompt' tokenizes to zero tokens")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise FieldError(field, f"'input_ids' has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.context_len:
            raise FieldError(field,
                f"the prompt has {len(ids)} tokens, more than the context length allows "
                f"({self.context_len} tokens including at least one generated)"
            )
        if req.return_logprob and req.logprob_start_len >= len(ids):
            raise FieldError("logprob_start_len", f"logprob_start_len ({req.logprob_start_len}) must be less "
                                                  f"than the prompt's length ({len(ids)} tokens)")

    # ---- receiving ----
    async def _handle_loop(self) -> None:
        while True:
            msg = await self.recv_sock.recv_pyobj()
            if isinstance(msg, io.BatchStrOut):
                now = time.monotonic()
                for out in msg.outputs:
                    self._count_progress(out)
                    state = self.states.get(out.rid)
                    if state is None:
                        continue  # the caller gave up on it
                    state.pending.append(out)
                    state.finished = out.finished_reason is not None
                    state.event.set()
                    if self.metrics:
                        self.metrics.on_output(state, out, now)
                    if state.finished and self.server_args.log_requests:
                        self._log_request(state, out, now)
            elif isinstance(msg, io.SchedulerStats):
                if self.metrics:
                    self.metrics.on_stats(msg)
            else:
                self._on_reply(msg)

    def _count_progress(self, out: io.ReqOutput) -> None:
        """The serving replica's load: what it generated, and its end."""
        if out.finished_reason is not None:
            self.dispatcher.on_finished(out.rid)
        else:
            self.dispatcher.on_generated(out.rid, len(out.new_token_ids))

    def _on_reply(self, msg: io.ControlOut) -> None:
        """A replica's reply; the caller gets one answer once every replica has replied."""
        waiting = self._replies.get(getattr(msg, "request_id", None))
        if waiting is None:
            logger.warning("a reply nobody waits for: %r", type(msg).__name__)
            return
        fut, replies = waiting
        replies.append(msg)
        if len(replies) == self.dispatcher.dp_size and not fut.done():
            fut.set_result(merge_replies(sorted(replies, key=lambda r: r.dp_rank)))

    def _log_request(self, state: ReqState, out: io.ReqOutput, now: float) -> None:
        line = (f"request {state.req.rid}: prompt_tokens={out.prompt_tokens} "
                f"completion_tokens={out.completion_tokens} finish={out.finished_reason} "
                f"latency={now - state.created:.3f}s")
        if self.server_args.log_requests_level >= 2:  # text only when asked for
            line += f" prompt={state.req.prompt!r} output={state.text + out.new_text!r}"
        logger.info(line)

    async def control(self, request: io.ControlReq) -> io.ControlOut:
        """Send a control request to the scheduler (every data-parallel replica)
        and wait for the replies that name its request_id (replies to concurrent
        calls may come in any order); the replicas' replies are folded into one."""
        self._ensure_started()
        if self._dead:
            raise RuntimeError(self._dead)
        if request.request_id in self._replies:
            raise ValueError(f"control request_id {request.request_id!r} is already waiting for a reply")
        fut = asyncio.get_running_loop().create_future()
        self._replies[request.request_id] = (fut, [])
        try:
            for sock in self.replica_socks:
                sock.send_pyobj(request)
            return await fut
        finally:
            self._replies.pop(request.request_id, None)

    # ---- control ----
    def abort_request(self, rid: Optional[str] = None, abort_all: bool = False) -> None:
        """Abort one request (on the replica serving it) or every request."""
        self._ensure_started()
        replica = None if abort_all or rid is None else self.dispatcher.replica_of(rid)
        socks = self.replica_socks if replica is None else [self.replica_socks[replica]]
        for sock in socks:
            sock.send_pyobj(io.AbortReq(rid=rid, abort_all=abort_all))

    async def get_server_info(self) -> Dict[str, Any]:
        reply = await self.control(io.GetServerInfoReq())
        return reply.info

    async def flush_cache(self, flush_storage: bool = False) -> io.FlushCacheOut:
        return await self.control(io.FlushCacheReq(flush_storage=flush_storage))

    # ---- live weights ----
    async def update_weights(self, request: Any) -> io.UpdateWeightsOut:
        """An UpdateWeightsFrom{Disk,Tensor,Distributed}Req; answers once applied
        (after the running requests and any update asked before it)."""
        return await self.control(request)

    async def pause_generation(self, mode: str = "in_place") -> io.GenerationControlOut:
        return await self.control(io.PauseGenerationReq(mode))

    async def continue_generation(self) -> io.GenerationControlOut:
        return await self.control(io.ContinueGenerationReq())

    # ---- LoRA adapters ----
    def _lora_registry(self) -> LoRARegistry:
        if self.lora is None:
            raise ValueError("LoRA is not enabled; start the server with --enable-lora")
        return self.lora

    async def load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool = False) -> io.LoRAAdapterOut:
        """Load an adapter while serving; ValueError for a bad name, path or adapter."""
        registry = self._lora_registry()
        if not isinstance(lora_path, str) or not lora_path:
            raise FieldError("lora_path", "'lora_path' must be a non-empty string (a PEFT adapter folder)")
        lora_id = registry.begin_load(lora_name)
        ref = None
        try:
            out = await self.control(io.LoadLoRAAdapterReq(lora_name, lora_path, lora_id, bool(pinned)))
            if out.success:
                ref = LoRARef(lora_name, lora_path, lora_id, bool(pinned))
        finally:
            registry.end_load(ref, lora_name)
        return out

    async def unload_lora_adapter(self, lora_name: str) -> io.LoRAAdapterOut:
        """New requests cannot name it from now on; its running requests finish
        first, then its weights go."""
        registry = self._lora_registry()
        ref = registry.remove(lora_name)
        await registry.wait_idle(ref.lora_id)
        return await self.control(io.UnloadLoRAAdapterReq(lora_name, ref.lora_id))

    async def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        out = await self.control(io.GetWeightsByNameReq(name, truncate_size))
        if out.error:
            raise ValueError(out.error)
        return out.values


def _raise_if_rejected(out: io.ReqOutput) -> None:
    """A scheduler rejection becomes the caller's exception: bad input is a
    ValueError (HTTP 400), overload a RequestRejected with status 503."""
    reason = out.finished_reason or {}
    status = reason.get("status_code")
    if status is None:
        return
    if status == 400:
        raise ValueError(reason["message"])
    raise RequestRejected(status, reason["message"])


def is_short_single(obj: GenerateReqInput) -> bool:
    """One prompt short enough to check and tokenize on the event loop, no images."""
    if obj.image_data is not None:
        return False
    if obj.prompt is not None:
        return isinstance(obj.prompt, str) and len(obj.prompt) <= INLINE_PROMPT_LIMIT
    ids = obj.input_ids
    return isinstance(ids, list) and len(ids) <= INLINE_PROMPT_LIMIT and not (ids and isinstance(ids[0], list))
