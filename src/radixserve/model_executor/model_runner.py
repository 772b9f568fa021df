"""ModelRunner: owns the model, the KV memory and the attention backend; runs one forward."""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
from torch import nn

from radixserve.distributed import ParallelConfig, get_tp_group, init_distributed
from radixserve.layers.attention.base import AttentionBackend
from radixserve.layers.attention.mla_backend import MLABackend
from radixserve.layers.block_fp8 import block_fp8_format
from radixserve.layers import cpu_kernels
from radixserve.layers.cpu_quantized_paths import decode_step
from radixserve.layers.pooler import EmbeddingOutput, PoolingConfig, pool_extend, read_pooling_config
from radixserve.layers.quantization import (
    WeightFormat, gguf_weight_format, is_4bit_gguf, quantize_linears, unquantized, weight_format_of,
)
from radixserve.mem_cache.allocator import ReqToTokenPool, TokenAllocator
from radixserve.mem_cache.kv_dtype import resolve_kv_cache_dtype
from radixserve.mem_cache.kv_layout import KVLayout, MLAKVLayout, default_kv_layout, kv_layout_of
from radixserve.mem_cache.memory_pools import MemoryPools
from radixserve.mem_cache.hicache import make_prefix_cache
from radixserve.model_executor.cpu_decode_layers import CpuDecodeLayers
from radixserve.model_executor.cpu_eagle3_layer import CpuEagle3Layer
from radixserve.model_executor.forward_batch import ForwardBatch
from radixserve.model_executor.logits_output import LogitsOutput
from radixserve.model_loader.fp8 import block_fp8_size, checkpoint_block_fp8_size
from radixserve.model_loader.loader import build_model, load_model
from radixserve.model_loader.quantized_cache import cache_name, load_quantized, save_quantized
from radixserve.model_loader.source import resolve_model_source
from radixserve.model_loader.weight_loader import get_weight, load_weights
from radixserve.multimodal.embedder import image_embeds_for
from radixserve.server_args import ServerArgs
from radixserve.speculative.spec_args import DRAFT_MODEL_ALGORITHMS
from radixserve.utils.hf_utils import cache_dir, get_context_length, load_config
from radixserve.utils.cpu_malloc import keep_freed_memory

if TYPE_CHECKING:
    from radixserve.model_executor.memory_saver import ReleasedMemory

logger = logging.getLogger(__name__)

CPU_KV_POOL_BYTES = 2 << 30  # on CPU, with no size given, the pool takes at most 2 GiB
CPU_MAX_TOTAL_TOKENS = 1 << 17


def resolve_dtype(dtype: str, device: str, weight_format: Optional[WeightFormat] = None) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if weight_format is not None and weight_format.activation_dtype is not None:
        return weight_format.activation_dtype
    return torch.bfloat16 if device == "cuda" else torch.float32


def resolve_weight_format(args: ServerArgs, source_kind: str, config: Any, device_type: str) -> Optional[WeightFormat]:
    """The flags' weight format; with none asked for, a GGUF of 4-bit
    projections on the CPU keeps them 4-bit (as SGLang and vLLM serve a GGUF
    quantized): the fastest choice there. `--dtype float32` (or any explicit
    dtype) and deterministic mode keep the dequantized weights instead."""
    block_types = getattr(config, "gguf_block_types", None) or ()
    if args.quantization == "gguf" and source_kind != "gguf":
        raise ValueError(f"quantization=gguf needs a .gguf model; {args.model_path!r} is not one "
                         f"(torchao_config=int4wo-32 quantizes any checkpoint the same way)")
    fp8_block = block_fp8_size(getattr(config, "quantization_config", None)) if source_kind == "hf" else None
    if fp8_block is not None and keeps_block_fp8(args, device_type):
        return block_fp8_format(fp8_block)
    asked = weight_format_of(args.quantization, args.torchao_config, block_types)
    if asked is not None or args.dtype != "auto" or device_type != "cpu" or args.enable_deterministic_inference:
        return asked
    return gguf_weight_format(block_types) if is_4bit_gguf(block_types) else None


def keeps_block_fp8(args: ServerArgs, device_type: str) -> bool:
    """Whether a block-FP8 checkpoint is served in FP8 (its block-scaled
    GEMMs) rather than dequantized at load: on CUDA unless another format or
    deterministic inference is asked for; on the CPU, which has no FP8 GEMM
    (the torch reference path), only with --quantization fp8."""
    if args.quantization == "fp8":
        return True
    return (device_type == "cuda" and args.quantization is None and args.torchao_config is None
            and not args.enable_deterministic_inference)


def _moves_weights_or_pools(method: Callable) -> Callable:
    """A ModelRunner method after which weights (or their quantized copies) or
    the KV pool may live elsewhere: the fused CPU decode layers, which hold
    their addresses, are rebuilt on their next step."""
    @functools.wraps(method)
    def wrapper(self: "ModelRunner", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:
            if getattr(self, "cpu_decode_layers", None) is not None:
                self.cpu_decode_layers.forget()
    return wrapper


class ModelRunner:
    def __init__(self, server_args: ServerArgs, tp_rank: int = 0, dist_init_method: Optional[str] = None,
                 dp_rank: int = 0, warm_up: bool = True) -> None:
        """One rank's runner. With tp_size > 1 every rank of a replica constructs
        one with its tp_rank and the replica's dist_init_method ("tcp://host:port");
        dp_rank: which data-parallel replica it belongs to."""
        self.server_args = server_args
        self.tp_rank, self.dp_rank = tp_rank, dp_rank
        self.device = torch.device(server_args.resolved_device())
        if self.device.type == "cuda" and self.device.index is None:
            # set_device and memory queries need an index; rank r of replica d on
            # this node uses base + d * (ranks per replica here) + r
            per_replica = server_args.tp_size // server_args.nnodes
            local_rank = dp_rank * per_replica + tp_rank % per_replica
            self.device = torch.device("cuda", server_args.base_gpu_id + local_rank)
        self.parallel = ParallelConfig(server_args.tp_size, tp_rank, server_args.ep_size)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # before NCCL starts: it binds to the current device
        init_distributed(self.parallel, self.device, dist_init_method or "", server_args.dist_timeout)
        self.source = resolve_model_source(server_args.model_path)
        self.config = load_config(self.source)
        self.weight_format = resolve_weight_format(server_args, self.source.kind, self.config, self.device.type)
        self.dtype = resolve_dtype(server_args.dtype, self.device.type, self.weight_format)
        self.kv_cache_dtype = resolve_kv_cache_dtype(server_args.kv_cache_dtype, self.dtype)
        self.context_len = server_args.context_length or get_context_length(self.config)
        # --is-embedding: extend forwards return pooled hidden states, never logits.
        self.pooling: Optional[PoolingConfig] = (
            read_pooling_config(self.source.folder if self.source.kind == "hf" else None)
            if server_args.is_embedding else None)
        self.model = self._load_model()
        if self.device.type == "cpu":
            # From here each layer's large tensors reuse the last layer's freed memory
            # (after the load, whose temporaries go back to the system).
            keep_freed_memory()
            cpu_kernels.available()  # built (or loaded) now, not in the first request
        self.vocab_size = self.config.get_text_config().vocab_size  # (a VLM's is its decoder's)
        self.deterministic = server_args.enable_deterministic_inference
        if self.deterministic:
            self._use_batch_invariant_layers()
        # Adapter slots are allocated before the KV pool is sized from what is left.
        self.lora_manager = self._make_lora_manager()
        self._init_memory()
        self.attn_backend = self._make_attn_backend()
        self.spec_graph_shapes: list = []  # speculative decoding's forwards (add_spec_graphs)
        self.graph_runners = self._make_graph_runners()
        # A CPU decode batch's layers (or an EAGLE-3 head's draft step) in one C++
        # call where the model qualifies (cpu_decode_layers.py, cpu_eagle3_layer.py);
        # RADIXSERVE_CPU_FUSED_LAYERS=0 keeps them eager.
        self.cpu_decode_layers = None
        if os.environ.get("RADIXSERVE_CPU_FUSED_LAYERS", "1") != "0":
            self.cpu_decode_layers = (
                CpuDecodeLayers.for_model(self.model, self.device, self.dtype, self.lora_manager)
                or CpuEagle3Layer.for_model(self.model, self.device, self.dtype, self.lora_manager))
        if self.device.type == "cuda" and warm_up:
            # Every Triton kernel variant a request can reach is compiled now,
            # not inside the first requests (kernel_warmup.py says which).
            from radixserve.model_executor.kernel_warmup import warm_up_kernels

            warm_up_kernels(self)
        elif self.device.type == "cpu" and warm_up:
            from radixserve.model_executor.kernel_warmup import warm_up_cpu_weights

            warm_up_cpu_weights(self)

    # ---- memory ----
    def _kv_layout(self) -> KVLayout:
        """What the model caches per token (per-head K/V, or MLA's latent): its class says."""
        return kv_layout_of(self.model, self.config)

    def _draft_kv_bytes_per_token(self) -> int:
        """A speculative draft model's KV per token: its pool holds as many
        tokens as this one's, so the memory that sizes this pool pays for both
        (an equal-sized STANDALONE draft would otherwise ask for a second pool
        as large as the first). Its weights come out of the headroom."""
        args = self.server_args
        if args.speculative_algorithm not in DRAFT_MODEL_ALGORITHMS or not args.speculative_draft_model_path:
            return 0
        config = load_config(resolve_model_source(args.speculative_draft_model_path))
        return default_kv_layout(config.get_text_config()).bytes_per_token(self.kv_cache_dtype)

    def _profile_max_num_tokens(self) -> int:
        args = self.server_args
        if args.max_total_tokens is not None:
            return args.max_total_tokens
        per_token = self._kv_layout().bytes_per_token(self.kv_cache_dtype) + self._draft_kv_bytes_per_token()
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            used_by_weights = torch.cuda.memory_allocated(self.device)
            fraction = args.mem_fraction_static or 0.85
            # Memory other processes hold on this GPU is not ours to give the
            # pool: keep the (1 - fraction) headroom out of what is free now.
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = min(total * fraction - used_by_weights, free - total * (1 - fraction))
            if budget <= 0:
                raise ValueError(
                    f"mem_fraction_static={fraction} leaves no room for the KV cache "
                    f"after {used_by_weights / 2**30:.1f} GiB of weights"
                )
            # The allocator's free list holds one int64 per page, and freeing
            # concatenates a new one beside the old: 16 bytes a page besides the
            # KV. A tiny model's pool has about 1e9 slots, whose free list (7.4
            # GiB with an FP8 cache) overflowed the headroom when left uncounted.
            return int(budget // (per_token + 16 / args.resolved_page_size()))
        if args.mem_fraction_static is not None:
            import os

            # The host's memory is shared by this node's ranks (of every replica).
            ranks_here = max(args.ranks_per_node, 1)
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // ranks_here
            weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
            return int(max(total * args.mem_fraction_static - weights, per_token) // per_token)
        return min(CPU_KV_POOL_BYTES // per_token, CPU_MAX_TOTAL_TOKENS)

    def _init_memory(self) -> None:
        args = self.server_args
        page = args.resolved_page_size()
        # Every rank takes the smallest rank's pool: they schedule the same
        # batches, and capture the same CUDA graphs (whose collectives must pair up).
        num_tokens = get_tp_group().min_over_ranks(self._profile_max_num_tokens()) // page * page
        if num_tokens < page:
            raise ValueError(f"KV cache too small: {num_tokens} tokens with page_size {page}")
        self.max_total_num_tokens = num_tokens
        max_running = args.max_running_requests or min(max(num_tokens // 64, 16), 1024)
        self.max_running_requests = max_running
        self.allocator = TokenAllocator(num_tokens, page, self.device)
        self.kv_layout = self._kv_layout()
        self.kv_bytes_per_token = self.kv_layout.bytes_per_token(self.kv_cache_dtype)
        # +1 row: a spare row for a chunked request alongside a full running batch
        req_to_token_pool = ReqToTokenPool(max_running + 1, self.context_len + 1, self.device)
        kv_pool = self.kv_layout.make_pool(self.allocator.num_slots, self.kv_cache_dtype, self.device)
        # Storage keys name the model and its KV shape: pages of another model never match.
        identity = f"{args.model_path}|{self.kv_cache_dtype}|{self.kv_layout.describe()}"
        self.pools = MemoryPools(
            req_to_token_pool=req_to_token_pool,
            allocator=self.allocator,
            kv_pool=kv_pool,
            prefix_cache=make_prefix_cache(args, req_to_token_pool, self.allocator, kv_pool,
                                           self.kv_bytes_per_token, identity, self.tp_rank),
        )
        logger.info(
            "KV cache: %d tokens (%s, %s; %d bytes per token, %.2f GiB), max running requests %d",
            num_tokens, self.kv_layout.describe(), self.kv_cache_dtype, self.kv_bytes_per_token,
            self.kv_bytes_per_token * self.allocator.num_slots / 2**30, max_running,
        )

    def _make_attn_backend(self) -> AttentionBackend:
        name = self.server_args.resolved_attention_backend()
        if name == "torch_native":
            from radixserve.layers.attention.torch_native import TorchNativeAttnBackend

            backend = TorchNativeAttnBackend(deterministic=self.deterministic)
        else:
            from radixserve.layers.attention.triton_attn_backend import TritonAttnBackend

            backend = TritonAttnBackend(self.device, self.context_len if self.deterministic else None)
        if isinstance(self.kv_layout, MLAKVLayout) and not isinstance(backend, MLABackend):
            raise ValueError(f"attention_backend {name!r} cannot serve multi-head latent attention models")
        return backend

    def _load_model(self) -> nn.Module:
        """The model with its weights, quantized when a weight format is in
        effect. A GGUF's quantized weights come from the cache its first start
        wrote (model_loader/quantized_cache.py), when there is one."""
        args, fmt = self.server_args, self.weight_format
        cache = None
        if fmt is not None and self.source.kind == "gguf" and args.load_format == "auto" and args.tp_size == 1:
            cache = cache_dir(self.source.path, cache_name(fmt, self.dtype)) / "model.safetensors"
            if cache.is_file():
                model = build_model(self.config, self.dtype, self.device)
                try:
                    load_quantized(model, cache, fmt)
                    logger.info("%s weights from the cache %s", fmt.name, cache)
                    return model
                except (ValueError, OSError, RuntimeError) as e:  # rebuilt and written again below
                    logger.warning("quantized weight cache %s unusable (%s); rebuilding", cache, e)
        block_fp8 = fmt if fmt is not None and fmt.block is not None else None
        self.model = load_model(self.source, self.config, self.dtype, self.device, args.load_format,
                                with_lm_head=not args.is_embedding, block_fp8=block_fp8)
        if fmt is not None and block_fp8 is None:  # (a block-FP8 checkpoint's linears were loaded in FP8)
            self._quantize(fmt)
        if cache is not None:
            save_quantized(self.model, cache)
        return self.model

    def _quantize(self, fmt: WeightFormat) -> None:
        """--quantization fp8 / --torchao-config int8wo: the linear layers' weights
        are quantized now; their unquantized copies are freed before the KV pool is sized."""
        count = quantize_linears(self.model, fmt, skip=getattr(self.model, "UNQUANTIZED_LINEARS", ()))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info("%s: %d weights quantized", fmt.name, count)

    def _use_batch_invariant_layers(self) -> None:
        """--enable-deterministic-inference: every layer with a batch-invariant
        mode (linear projections, the LM head, the experts) switches to it."""
        if not getattr(self.model, "supports_deterministic_inference", False):
            raise ValueError(
                f"--enable-deterministic-inference is not supported for {type(self.model).__name__} yet"
            )
        for module in self.model.modules():
            if hasattr(module, "batch_invariant"):
                module.batch_invariant = True

    def _make_lora_manager(self):
        if not self.server_args.enable_lora:
            return None
        from radixserve.lora.manager import LoRAManager

        return LoRAManager(self.server_args, self.model, self.device, self.dtype)

    def _make_graph_runners(self) -> list:
        return self._make_plain_graph_runners() + self._make_spec_graph_runners()

    def add_spec_graphs(self, shapes: list) -> None:
        """CUDA graphs for speculative decoding's forwards (SpecGraphShape each;
        the speculative worker knows them), where this runner can take them;
        they are captured again after a memory release, as the others are."""
        self.spec_graph_shapes = list(shapes)
        self.graph_runners += self._make_spec_graph_runners()

    def _make_spec_graph_runners(self) -> list:
        if not self.spec_graph_shapes:
            return []
        from radixserve.model_executor.spec_graph_runner import SpecGraphRunner, spec_graph_support

        why_not = spec_graph_support(self)
        if why_not is not None:
            if self.device.type == "cuda":
                logger.warning("speculative decoding runs without CUDA graphs: %s", why_not)
            return []
        return [SpecGraphRunner(self, shape) for shape in self.spec_graph_shapes]

    def _make_plain_graph_runners(self) -> list:
        """Decode CUDA graphs, and graphs for one request's short prefill, when
        on CUDA with a graph-safe attention backend."""
        args = self.server_args
        if self.device.type != "cuda" or args.disable_cuda_graph or args.is_embedding:
            return []  # (an embedding server never decodes)
        if self.lora_manager is not None and not self.lora_manager.use_triton:
            # The torch path's row groups change with every batch; a graph would replay stale ones.
            logger.warning("CUDA graphs need --lora-backend triton; running without them")
            return []
        if args.resolved_attention_backend() != "triton":
            logger.warning("CUDA graphs need --attention-backend triton; running without them")
            return []
        from radixserve.model_executor.cuda_graph_runner import CudaGraphRunner
        from radixserve.model_executor.prefill_graph_runner import PrefillGraphRunner

        runners = [CudaGraphRunner(self, min(args.cuda_graph_max_bs or 256, self.max_running_requests))]
        # MLA picks its attention form and gathers from the host-side lengths,
        # which a graph would freeze; adapters are prepared per batch.
        if (args.prefill_cuda_graph_max_tokens > 0 and self.lora_manager is None
                and not isinstance(self.kv_layout, MLAKVLayout)):
            runners.append(PrefillGraphRunner(self, args.prefill_cuda_graph_max_tokens))
        return runners

    # ---- live weights (RL) ----
    @_moves_weights_or_pools
    @torch.inference_mode()
    def update_weights_from_disk(self, model_path: str, load_format: Optional[str] = None) -> None:
        """Every weight from another checkpoint of the same architecture and
        shapes. A block-FP8 checkpoint with the blocks this model keeps loads
        straight into its FP8 weights; any other into dequantized copies."""
        from radixserve.model_loader.loader import block_fp8_weights_of, open_weights

        source = resolve_model_source(model_path)
        if (load_format or "auto") != "auto":
            raise ValueError(f"load_format must be 'auto' for a weight update, got {load_format!r}")
        fmt = self.weight_format
        if fmt is not None and fmt.block is not None and source.kind == "hf" \
                and checkpoint_block_fp8_size(source.folder) == fmt.block:
            # (no dequantized copy of the whole model: DeepSeek-V3's would not fit)
            load_weights(self.model, open_weights(source, block_fp8_weights_of(self.model)), strict=True)
            return
        with unquantized(self.model):
            load_weights(self.model, open_weights(source), strict=True)

    @_moves_weights_or_pools
    @torch.inference_mode()
    def update_weights_from_tensor(self, named_tensors) -> None:
        """Some or all weights, by their Hugging Face names (a trainer's state_dict)."""
        with unquantized(self.model):
            load_weights(self.model, ((n, t.to(self.device)) for n, t in named_tensors), strict=False)

    @_moves_weights_or_pools
    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        """The first truncate_size values of a weight, flattened, as floats.
        Under tensor parallelism: this rank's shard of it (its heads, columns,
        vocab slice; ValueError for an expert another rank holds)."""
        with unquantized(self.model):  # (FP8 linears: their real values)
            return get_weight(self.model, name).flatten()[:truncate_size].float().tolist()

    @_moves_weights_or_pools
    def release_memory_occupation(self) -> "ReleasedMemory":
        """Free the KV pool (its contents are dropped) and, on CUDA, move the
        weights to host memory. The caller makes sure no request holds KV."""
        from radixserve.model_executor.memory_saver import release_memory

        # The graphs replay the addresses about to be freed: drop them first,
        # so their memory pools are freed too.
        self.graph_runners = []
        return release_memory(self.model, self.pools.kv_pool, self.device)

    @_moves_weights_or_pools
    def resume_memory_occupation(self, released: "ReleasedMemory") -> None:
        """Weights back on the device, the KV pool recreated (zeros), CUDA
        graphs captured again over the new addresses."""
        from radixserve.model_executor.memory_saver import resume_memory

        resume_memory(self.pools.kv_pool, released)
        self.graph_runners = self._make_graph_runners()

    # ---- forward ----
    @torch.inference_mode()
    def forward(self, forward_batch: ForwardBatch) -> Union[LogitsOutput, EmbeddingOutput]:
        """Logits of one batch: every request's next token, and the rows
        `logits_indices` asks for (input logprobs) when there are more. An
        embedding server's extend batches give pooled hidden states instead."""
        for graphs in self.graph_runners:
            if graphs.can_run(forward_batch):
                return graphs.replay(forward_batch)
        return self.forward_eager(forward_batch)

    @torch.inference_mode()
    def forward_eager(self, forward_batch: ForwardBatch) -> Union[LogitsOutput, EmbeddingOutput]:
        """forward without CUDA graphs (the start-up warm-up compiles the kernels this path takes)."""
        if forward_batch.forward_mode.is_decode() or forward_batch.as_decode_step:
            with decode_step():  # the CPU's quantized GEMMs may pick another path (cpu_quantized_paths.py)
                return self._forward_eager(forward_batch)
        return self._forward_eager(forward_batch)

    def _forward_eager(self, forward_batch: ForwardBatch) -> Union[LogitsOutput, EmbeddingOutput]:
        fb = forward_batch
        fb.attn_backend = self.attn_backend
        self.attn_backend.init_forward_metadata(fb)
        if self.lora_manager is not None:
            tokens = [1] * fb.batch_size if fb.forward_mode.is_decode() else fb.extend_seq_lens_cpu
            self.lora_manager.prepare(fb.lora_ids or [None] * fb.batch_size, tokens)
        if fb.mm_items:
            fb.mm_embeds = image_embeds_for(self.model, fb.mm_items, self.device)
        if self.cpu_decode_layers is not None and self.cpu_decode_layers.takes(fb):
            hidden = self.cpu_decode_layers.forward(fb)
        else:
            hidden = self.model(fb.input_ids, fb.positions, fb)
        if self.pooling is not None:
            return pool_extend(hidden, fb.extend_seq_lens, fb.logits_indices[fb.last_logit_rows], self.pooling)
        if fb.forward_mode.is_decode():
            out = LogitsOutput(self.model.compute_logits(hidden), None)
            last_hidden = hidden
        else:
            logits = self.model.compute_logits(hidden[fb.logits_indices])
            next_token_logits = logits[fb.last_logit_rows]
            has_input_rows = logits.shape[0] > next_token_logits.shape[0]
            out = LogitsOutput(next_token_logits, logits if has_input_rows else None)
            last_hidden = hidden[fb.logits_indices][fb.last_logit_rows] if fb.return_hidden else None
        out.aux_hidden = fb.aux_hidden
        out.hidden = last_hidden if fb.return_hidden else None
        return out
