"""Engine: the offline API. The same TokenizerManager and subprocesses as the
server, without HTTP.

The TokenizerManager's asyncio loop runs in a background thread of the
caller's process, so the synchronous methods work anywhere (scripts, notebooks,
threads) and the async ones work from any event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
from typing import TYPE_CHECKING, Any, AsyncIterator, Dict, Iterator, List, Optional, Tuple, Union

from radixserve.entrypoints.runtime import Runtime
from radixserve.managers import io_struct as io
from radixserve.managers.embedding_input import EmbeddingReqInput, encode_request
from radixserve.managers.generate_input import GenerateReqInput
from radixserve.server_args import ServerArgs, configure_logging

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_DONE = object()


class Engine:
    """Bad arguments (a model path that is not a model, an unknown option) raise
    ValueError before any process starts; a model that fails to load raises
    radixserve.entrypoints.runtime.StartupError."""

    def __init__(self, model_path: Optional[str] = None, **kwargs: Any) -> None:
        self.server_args = ServerArgs.from_kwargs(model_path=model_path, **kwargs)
        configure_logging(self.server_args.log_level)
        self.runtime = Runtime.start(self.server_args)
        self.tokenizer = self.runtime.tokenizer
        self.tokenizer_manager = self.runtime.tokenizer_manager
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="radixserve-tm")
        self._thread.start()
        self.runtime.loop = self._loop
        self._closed = False
        self.runtime.watch_children()  # a dead child fails every pending call
        atexit.register(self.shutdown)

    @property
    def _procs(self) -> list:
        """The scheduler and detokenizer processes."""
        return self.runtime.procs

    # ---- generate ----
    def generate(
        self, prompt: Union[str, List[str], None] = None,
        sampling_params: Union[Dict[str, Any], List[Dict[str, Any]], None] = None,
        input_ids: Union[List[int], List[List[int]], None] = None,
        rid: Union[str, List[str], None] = None, return_logprob: Union[bool, List[bool]] = False,
        logprob_start_len: Union[int, List[int]] = -1, top_logprobs_num: Union[int, List[int]] = 0,
        return_text_in_logprobs: bool = False, stream: bool = False, routed_dp_rank: Optional[int] = None,
        lora_path: Union[str, List[Optional[str]], None] = None, image_data: Union[str, List[Any], None] = None,
    ) -> Union[Dict[str, Any], List[Dict[str, Any]], Iterator[Dict[str, Any]]]:
        """routed_dp_rank: the data-parallel replica to serve it (None: --load-balance-method picks);
        lora_path: the LoRA adapter's name, or one per prompt (None: the base model);
        image_data: images for a vision-language model's image placeholders (data URLs or
        file paths; a list per prompt for a batch)."""
        obj = GenerateReqInput(prompt, input_ids, sampling_params, rid, return_logprob, logprob_start_len,
                               top_logprobs_num, return_text_in_logprobs, stream, routed_dp_rank, lora_path,
                               image_data)
        if stream:
            return self._sync_stream(obj)
        results = self._run(self._collect(obj))
        return results if self._is_list(obj, results) else results[0]

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, rid=None,
                             return_logprob=False, logprob_start_len=-1, top_logprobs_num=0,
                             return_text_in_logprobs=False, stream=False, routed_dp_rank=None, lora_path=None):
        """Same arguments as generate. Await it for the result(s); with stream=True
        the awaited value is an async iterator of chunks."""
        obj = GenerateReqInput(prompt, input_ids, sampling_params, rid, return_logprob, logprob_start_len,
                               top_logprobs_num, return_text_in_logprobs, stream, routed_dp_rank, lora_path)
        if stream:
            obj.split(dp_size=self.server_args.dp_size)  # bad input raises at the call, not at a chunk
            return self._async_stream(obj)
        results = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._collect(obj), self._loop))
        return results if self._is_list(obj, results) else results[0]

    # ---- embeddings (--is-embedding) ----
    def encode(self, prompt: Union[str, List[str], None] = None,
               input_ids: Union[List[int], List[List[int]], None] = None,
               dimensions: Optional[int] = None) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
        """{"embedding": [...], "meta_info": {...}} per input (a list for a list
        of inputs): the pooled, L2-normalized vector; dimensions truncates it
        (matryoshka models only). ValueError for bad input."""
        obj = EmbeddingReqInput(text=prompt, input_ids=input_ids, dimensions=dimensions,
                                input_field="prompt" if prompt is not None else "input_ids")
        results = self._run(encode_request(self.tokenizer_manager, obj))
        return results if obj.is_batch else results[0]

    @staticmethod
    def _is_list(obj: GenerateReqInput, results: list) -> bool:
        return obj.is_batch or len(results) > 1

    async def _collect(self, obj: GenerateReqInput) -> List[Dict[str, Any]]:
        return [r async for r in self.tokenizer_manager.generate_request(obj)]

    def _sync_stream(self, obj: GenerateReqInput) -> Iterator[Dict[str, Any]]:
        obj.split(dp_size=self.server_args.dp_size)  # validate now, in the caller's frame
        chunks: queue.Queue = queue.Queue()
        future = asyncio.run_coroutine_threadsafe(self._pump(obj, chunks.put), self._loop)

        def iterate() -> Iterator[Dict[str, Any]]:
            try:
                while True:
                    item = chunks.get()
                    if item is _DONE:
                        future.result()  # re-raise what the producer raised
                        return
                    yield item
            finally:
                future.cancel()

        return iterate()

    async def _async_stream(self, obj: GenerateReqInput) -> AsyncIterator[Dict[str, Any]]:
        caller_loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            caller_loop.call_soon_threadsafe(chunks.put_nowait, item)

        future = asyncio.run_coroutine_threadsafe(self._pump(obj, put), self._loop)
        try:
            while True:
                item = await chunks.get()
                if item is _DONE:
                    future.result()
                    return
                yield item
        finally:
            future.cancel()

    async def _pump(self, obj: GenerateReqInput, put) -> None:
        try:
            async for chunk in self.tokenizer_manager.generate_request(obj):
                put(chunk)
        finally:
            put(_DONE)

    # ---- control ----
    def abort_request(self, rid: Optional[str] = None, abort_all: bool = False) -> None:
        if rid is None and not abort_all:
            raise ValueError("abort_request needs a rid or abort_all=True")
        self._loop.call_soon_threadsafe(self.tokenizer_manager.abort_request, rid, abort_all)

    def get_server_info(self) -> Dict[str, Any]:
        info = self._run(self.tokenizer_manager.get_server_info())
        info["model_path"] = self.server_args.model_path
        return info

    def flush_cache(self, flush_storage: bool = False) -> bool:
        """Empty the prefix cache (device and host tiers; storage too when asked)."""
        out = self._run(self.tokenizer_manager.flush_cache(flush_storage))
        if not out.success:
            logger.warning("flush_cache refused: %s", out.message)
        return out.success

    # ---- LoRA adapters ----
    def load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool = False) -> Dict[str, str]:
        """Load a PEFT adapter folder under lora_name while serving (pinned: it
        keeps a device slot for good). Returns the loaded adapters (name -> path);
        ValueError naming the problem if it cannot be loaded."""
        out = self._run(self.tokenizer_manager.load_lora_adapter(lora_name, lora_path, pinned))
        if not out.success:
            raise ValueError(out.message)
        return self.loaded_lora_adapters()

    def unload_lora_adapter(self, lora_name: str) -> Dict[str, str]:
        """Requests naming it are refused from now on; it is dropped once its
        running requests have finished (this call waits for them)."""
        out = self._run(self.tokenizer_manager.unload_lora_adapter(lora_name))
        if not out.success:
            raise ValueError(out.message)
        return self.loaded_lora_adapters()

    def loaded_lora_adapters(self) -> Dict[str, str]:
        registry = self.tokenizer_manager.lora
        return {ref.name: ref.path for ref in registry.adapters()} if registry else {}

    # ---- live weights (RL) ----
    def update_weights_from_disk(self, model_path: str, load_format: Optional[str] = None,
                                 weight_version: Optional[str] = None,
                                 abort_all_requests: bool = False) -> Tuple[bool, str]:
        """Load every weight from another checkpoint of this architecture. Running
        requests finish on the old weights first (or are aborted when asked);
        the prefix cache is emptied. Returns (success, message)."""
        req = io.UpdateWeightsFromDiskReq(str(model_path), load_format, weight_version, abort_all_requests)
        out = self._run(self.tokenizer_manager.update_weights(req))
        return out.success, out.message

    def update_weights_from_tensor(self, named_tensors: List[Tuple[str, "torch.Tensor"]], flush_cache: bool = True,
                                   weight_version: Optional[str] = None,
                                   abort_all_requests: bool = False) -> Tuple[bool, str]:
        """Replace some or all weights, named as in the Hugging Face checkpoint (a
        transformers model's state_dict works as is). The tensors reach the
        scheduler through shared memory, not as copies in a message (with tp or
        dp > 1, one handle per rank: all ranks must run on this node)."""
        buffer = self._tensor_payload(named_tensors)
        req = io.UpdateWeightsFromTensorReq(buffer, flush_cache, weight_version, abort_all_requests)
        out = self._run(self.tokenizer_manager.update_weights(req))
        return out.success, out.message

    def _tensor_payload(self, named_tensors: Any) -> Any:
        args = self.server_args
        num_ranks = args.tp_size * args.dp_size
        if num_ranks == 1:
            return shared_tensor_bytes(named_tensors)
        if args.nnodes > 1:
            raise ValueError("update_weights_from_tensor shares memory with the ranks, so they must all run "
                             "on this node (nnodes=1); use update_weights_from_distributed across nodes")
        # Each pickle hands out its own handles, one process may open each.
        return [shared_tensor_bytes(named_tensors) for _ in range(num_ranks)]

    def pause_generation(self, mode: str = "in_place") -> None:
        """Stop scheduling: "in_place" keeps running requests (and their KV) waiting,
        "abort" ends them all. New requests queue until continue_generation()."""
        out = self._run(self.tokenizer_manager.pause_generation(mode))
        if not out.success:
            raise ValueError(out.message)

    def continue_generation(self) -> None:
        self._run(self.tokenizer_manager.continue_generation())

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> List[float]:
        """The first truncate_size values of a weight (Hugging Face name), flattened."""
        return self._run(self.tokenizer_manager.get_weights_by_name(name, truncate_size))

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group",
                                  backend: Optional[str] = None) -> Tuple[bool, str]:
        """Join a process group with a trainer, which is rank 0 (the scheduler is
        rank rank_offset), for update_weights_from_distributed. The trainer calls
        radixserve.model_executor.weight_sync.init_custom_process_group(backend,
        "tcp://master_address:master_port", world_size, 0, group_name) meanwhile:
        this returns once every rank has joined. backend None: nccl on CUDA, gloo on CPU."""
        req = io.InitWeightsUpdateGroupReq(master_address, int(master_port), rank_offset, world_size,
                                           group_name, backend)
        out = self._control(req)
        return out.success, out.message

    def update_weights_from_distributed(self, names: List[str], dtypes: List[Any], shapes: List[List[int]],
                                        group_name: str = "weight_update_group", flush_cache: bool = True,
                                        weight_version: Optional[str] = None,
                                        abort_all_requests: bool = False) -> Tuple[bool, str]:
        """Receive these weights (Hugging Face names, with their dtypes and shapes)
        as broadcasts from rank 0 of the group, in this order; the trainer
        broadcasts them meanwhile. Same guarantees as update_weights_from_tensor."""
        req = io.UpdateWeightsFromDistributedReq(list(names), [str(d) for d in dtypes],
                                                 [list(s) for s in shapes], group_name, flush_cache,
                                                 weight_version, abort_all_requests)
        out = self._run(self.tokenizer_manager.update_weights(req))
        return out.success, out.message

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> Tuple[bool, str]:
        out = self._control(io.DestroyWeightsUpdateGroupReq(group_name))
        return out.success, out.message

    def release_memory_occupation(self) -> int:
        """Free the KV pool and the prefix cache (on CUDA the weights also move to
        host memory), e.g. while a trainer needs the GPU. Refused (ValueError)
        while requests run or wait: let them finish or pause_generation("abort")
        first. Until resume_memory_occupation(), new requests wait in the queue.
        Returns the bytes released."""
        out = self._control(io.ReleaseMemoryOccupationReq())
        if not out.success:
            raise ValueError(out.message)
        return out.num_bytes

    def resume_memory_occupation(self) -> int:
        """Weights and KV pool back (and CUDA graphs captured again); returns the bytes allocated."""
        out = self._control(io.ResumeMemoryOccupationReq())
        if not out.success:
            raise ValueError(out.message)
        return out.num_bytes

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def _control(self, request: Any) -> Any:
        """Send a control message to the scheduler and wait for its reply."""
        return self._run(self.tokenizer_manager.control(request))

    def _run(self, coro):
        if self._closed:
            coro.close()
            raise RuntimeError("the engine is shut down")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # ---- lifecycle ----
    def shutdown(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self.tokenizer_manager.close(), self._loop).result(timeout=5)
        except Exception as e:  # shutting down anyway
            logger.debug("tokenizer manager close: %s", e)
        self.runtime.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def shared_tensor_bytes(obj: Any) -> bytes:
    """obj pickled with torch's ForkingPickler: every tensor in it is moved to
    shared memory (CUDA: an IPC handle) and pickled as a handle, so the
    scheduler process maps the same memory instead of receiving a copy."""
    import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)
    from multiprocessing.reduction import ForkingPickler

    return bytes(ForkingPickler.dumps(obj))
