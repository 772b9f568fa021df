"""ServerArgs: the one configuration object, shared by the Engine and the server.

Flag names follow SGLang so that an SGLang user can switch by changing only the
command name.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
import logging
import numbers
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from radixserve.disaggregation.config import MODES as DISAGGREGATION_MODES
from radixserve.parsers import SUPPORTED_REASONING_PARSERS, SUPPORTED_TOOL_PARSERS

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
CPU_PAGE_SIZE = 16  # the CPU's default --page-size (ServerArgs.resolved_page_size)


def option(default: Any, help: str, nargs: Optional[str] = None, **kwargs: Any) -> Any:
    """A dataclass field that is also a command-line flag with this help text
    (nargs: a list flag, e.g. "+" for one or more values)."""
    metadata = {"help": help, "nargs": nargs}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# SGLang's names; auto is round_robin (follow_bootstrap_room is refused: disaggregated servers have dp_size 1).
LOAD_BALANCE_METHODS = ("auto", "round_robin", "total_requests", "total_tokens")
QUANTIZATIONS = (None, "fp8", "gguf", "w8a8_int8")
TORCHAO_CONFIGS = (None, "", "int8wo", "int4wo-32", "int4wo-64", "int4wo-128")
# --kv-cache-dtype: SGLang's names -> torch dtype names (None: the model's
# dtype; strings, so this module needs no torch). SGLang's fp4_e2m1 is not offered.
KV_CACHE_DTYPES: Dict[str, Optional[str]] = {
    "auto": None,
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


@dataclass
class ServerArgs:
    # Model and tokenizer
    model_path: Optional[str] = option(
        None, "a Hugging Face checkpoint folder (with config.json), a .gguf file, or a packaged model "
              f"name; nothing is downloaded. None: the packaged {DEFAULT_MODEL}")
    tokenizer_path: Optional[str] = option(None, "where the tokenizer comes from, if not the model's own "
                                                 "(a folder, a .gguf file or a packaged model name)")
    is_embedding: bool = option(False, "serve embeddings (/v1/embeddings, /encode) of a decoder model "
                                       "instead of generating: prefill only, pooled as the checkpoint's "
                                       "sentence-transformers files say (last token otherwise), L2-normalized")
    load_format: str = option("auto", "auto: the checkpoint's weights; dummy: random weights of the "
                                      "checkpoint's shapes (benchmarks without a download)")
    dtype: str = option("auto", "weights and activations: auto|float32|bfloat16|float16 (auto: "
                                "bfloat16 on CUDA; on the CPU float32, or bfloat16 with int8/int4 "
                                "weights, which a 4-bit GGUF gets by default)")
    device: str = option("auto", "auto|cpu|cuda (auto: cuda when available)")
    quantization: Optional[str] = option(None, "fp8: linear layers' weights quantized to FP8 E4M3 at load "
                                               "(per output channel), activations per token (a block-FP8 checkpoint, "
                                               "DeepSeek-V3's: kept in its own block-scaled FP8, as on CUDA by "
                                               "default); gguf (CPU, a .gguf "
                                               "model): its 4-bit weights kept 4-bit (int4wo-32); w8a8_int8 (CPU): "
                                               "int8 weights and per-token int8 activations; None: as loaded")
    torchao_config: Optional[str] = option(None, "int8wo: linear and LM-head weights as int8 (per output "
                                                 "channel); int4wo-32|64|128 (CPU): linear weights as int4 "
                                                 "in groups of 32|64|128 inputs, LM head int8; activations "
                                                 "bfloat16 (--dtype auto picks it); None: as loaded")
    context_length: Optional[int] = option(None, "longest prompt + output in tokens; None: the model config's")
    trust_remote_code: bool = option(False, "accepted for SGLang compatibility; no model code is "
                                            "downloaded, so it changes nothing")

    # Memory
    page_size: Optional[int] = option(None, "tokens per KV-cache page (the allocation unit); None: 16 on the CPU "
                                            "(at most the prefill chunk), 1 on a GPU")
    kv_cache_dtype: str = option("auto", "what the KV cache stores: auto (the model's dtype)|bf16|bfloat16|"
                                         "fp8_e4m3|fp8_e5m2 (FP8: half the bytes of bf16, values stored "
                                         "unscaled and saturated)")
    max_total_tokens: Optional[int] = option(None, "KV-cache size in tokens; None: from --mem-fraction-static "
                                                   "on CUDA, a fixed pool on the CPU")
    mem_fraction_static: Optional[float] = option(None, "fraction of device memory for weights + KV cache, "
                                                        "in (0, 1); None: 0.85 on CUDA")
    max_running_requests: Optional[int] = option(None, "most requests decoding at once; None: from the "
                                                       "KV-cache size (at most 1024)")

    # Hierarchical KV cache (HiCache): device -> host memory -> storage
    enable_hierarchical_cache: bool = option(False, "keep prefixes evicted from the device KV pool in a host "
                                                    "memory pool (and optionally storage) and load them back")
    hicache_ratio: float = option(2.0, "host KV pool size as a multiple of the device pool (> 1)")
    hicache_size: int = option(0, "host KV pool size in GB; overrides --hicache-ratio when > 0")
    hicache_write_policy: str = option("write_through", "when device KV is copied to the host: write_through "
                                                        "(when it enters the radix tree)|write_through_selective "
                                                        "(once its prefix is hit again)|write_back (at eviction)")
    hicache_io_backend: str = option("kernel", "host<->device copies: kernel (one batched gather/scatter "
                                               "per buffer)|direct (one copy per page)")
    hicache_mem_layout: str = option("page_first", "host pool layout: page_first|page_first_direct (a page's "
                                                   "tokens of every layer contiguous)|layer_first (one block "
                                                   "per layer, like the device pool)")
    hicache_storage_backend: Optional[str] = option(None, "third tier: file|mooncake|dynamic (a class named in "
                                                          "--hicache-storage-backend-extra-config); None: none")
    hicache_storage_backend_extra_config: Optional[str] = option(
        None, "JSON object for the storage backend (dynamic: module_path, class_name; prefetch_timeout_base, "
              "prefetch_timeout_per_ki_token in seconds)")
    hicache_storage_prefetch_policy: str = option("timeout", "how long an arriving request waits for its "
                                                             "prefix from storage: best_effort|wait_complete|"
                                                             "timeout")
    hicache_file_backend_dir: str = option("/tmp/radixserve_hicache", "folder of the file storage backend "
                                                                      "(kept across restarts)")

    # Prefill/decode disaggregation (docs/architecture.md, "Prefill/decode disaggregation")
    disaggregation_mode: str = option("null", "null: an ordinary server|prefill: computes prompts and writes "
                                              "their KV to decode servers|decode: receives KV and decodes")
    disaggregation_transfer_backend: str = option("mooncake", "the KV transfer engine: mooncake (TCP, or "
                                                              "RDMA with --disaggregation-ib-device)|nixl "
                                                              "(not available yet)")
    disaggregation_bootstrap_port: int = option(8998, "prefill servers: port of the bootstrap server where "
                                                      "decode servers look up the prefill ranks")
    disaggregation_ib_device: Optional[str] = option(None, "RDMA devices for Mooncake (e.g. mlx5_0); None: TCP")
    disaggregation_decode_enable_radix_cache: bool = option(False, "decode servers: keep a radix cache and "
                                                                   "ask the prefill server only for the KV "
                                                                   "past a cached prefix")
    disaggregation_transfer_timeout: float = option(300.0, "seconds a request may wait for its KV (decode) or "
                                                           "for its decode server (prefill) before it fails")

    # Scheduling
    chunked_prefill_size: Optional[int] = option(None, "longest prefill chunk in tokens; -1 disables "
                                                       "chunking; None: 8192 on CUDA, 2048 on the CPU")
    schedule_policy: str = option("fcfs", "order of the waiting queue: fcfs|lpm|dfs-weight|random "
                                          "(lpm and dfs-weight favour radix-cache hits)")
    disable_radix_cache: bool = option(False, "do not reuse KV of shared prefixes")
    max_prefill_tokens: int = option(16384, "most new prompt tokens in one prefill batch")
    schedule_conservativeness: float = option(1.0, "above 1 admits fewer requests (less retraction), "
                                                   "below 1 more")
    enable_mixed_chunk: bool = option(False, "decode the running requests in the same forward as each "
                                             "prefill (chunk), so new prompts do not stall them")
    stream_interval: int = option(1, "send a streaming chunk every this many tokens")
    incremental_streaming_output: bool = option(False, "each streamed chunk of /generate and the Engine "
                                                       "carries only its new text, not the text so far")

    # Structured outputs
    grammar_backend: str = option("xgrammar", "grammar engine for json_schema/regex/ebnf: xgrammar|none")
    constrained_json_disable_any_whitespace: bool = option(False, "JSON outputs without free whitespace")
    tool_call_parser: Optional[str] = option(None, "tool-call format: hermes|qwen25|llama3; None: "
                                                   "hermes when a request sends tools")
    reasoning_parser: Optional[str] = option(None, "split reasoning from the answer: qwen3|deepseek-r1; "
                                                   "None: no split")

    # Kernels and the GPU fast path
    attention_backend: Optional[str] = option(None, "torch_native|triton; None: triton on CUDA, "
                                                    "torch_native on the CPU")
    disable_cuda_graph: bool = option(False, "run decode and short prefills without CUDA graphs")
    cuda_graph_max_bs: Optional[int] = option(None, "largest decode batch captured in a CUDA graph; "
                                                    "None: 256, or fewer when memory is short")
    prefill_cuda_graph_max_tokens: int = option(
        512, "longest prefill (new tokens of one request) replayed from a CUDA graph; 0: prefills run eagerly")
    disable_overlap_schedule: bool = option(False, "do not prepare the next batch while the GPU runs this one")
    enable_deterministic_inference: bool = option(
        False, "bit-identical outputs whatever else is batched, however the prefill was chunked and "
               "whether the prefix came from the radix cache (slower kernels)")

    # Speculative decoding (speculative/): SGLang's flags; checks in speculative/spec_args.py
    speculative_algorithm: Optional[str] = option(None, "EAGLE|EAGLE3|NGRAM|STANDALONE; None: off")
    speculative_draft_model_path: Optional[str] = option(None, "STANDALONE: a smaller model, same tokenizer; "
                                                               "EAGLE3: a head folder (train_eagle3); "
                                                               "EAGLE: an EAGLE-1/2 head folder")
    speculative_num_steps: Optional[int] = option(None, "draft steps per verify; None: 3")
    speculative_eagle_topk: Optional[int] = option(
        None, "EAGLE/EAGLE3/STANDALONE: tokens kept per step (> 1: a top-K draft tree); NGRAM: only 1 "
              "(NGRAM's trees take the bfs breadths)")
    speculative_num_draft_tokens: Optional[int] = option(
        None, "tokens per verify (last token + drafts); None: num_steps + 1 (top-K trees: "
              "min(1 + topk * num_steps, 64)); trees: 2..64")
    speculative_token_map: Optional[str] = option(
        None, "EAGLE: a torch file of the hot token ids the head drafts over (EAGLE-3 heads carry their d2t)")
    speculative_ngram_min_bfs_breadth: int = option(1, "NGRAM: a tree node's children at the deepest level")
    speculative_ngram_max_bfs_breadth: int = option(
        10, "NGRAM: a tree node's children at the first level; 1: a chain")
    speculative_ngram_match_type: str = option("BFS", "NGRAM: BFS (latest continuation)|PROB (most frequent)")
    speculative_ngram_max_trie_depth: int = option(18, "NGRAM: longest n-gram matched against the history")
    speculative_ngram_capacity: int = option(10_000_000, "NGRAM: most n-grams indexed per request")
    speculative_max_batch_size: int = option(8, "radixserve's own: larger running batches decode without it")
    disable_speculative_adaptive: bool = option(
        False, "radixserve's own: speculate whenever the batch qualifies, even where the measured "
               "step times say plain decoding is faster")

    # LoRA adapters (lora/): many adapters on one base model, in one batch
    enable_lora: bool = option(False, "serve LoRA adapters (implied by --lora-paths)")
    lora_paths: Optional[Any] = option(None, "adapters to load at start-up: name=path (a PEFT folder with "
                                              "adapter_config.json and adapter_model.safetensors) or a path, "
                                              "whose folder name is then its name", nargs="+")
    max_loras_per_batch: int = option(8, "most distinct adapters in one batch (device slots)")
    max_lora_rank: Optional[int] = option(None, "largest adapter rank (slots are this wide); None: the "
                                                "largest rank of --lora-paths")
    lora_target_modules: Optional[list] = option(
        None, "projections adapters may target: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj "
              "(qkv_proj, gate_up_proj, all); None: those of --lora-paths", nargs="+")
    max_loaded_loras: Optional[int] = option(None, "most adapters held in host memory (>= "
                                                   "--max-loras-per-batch); None: no limit")
    lora_backend: str = option("triton", "triton|torch: the batched LoRA kernels (the CPU always runs torch)")
    lora_eviction_policy: str = option("lru", "lru|fifo: which adapter leaves a device slot for a new one")

    # Parallelism (torch.distributed: NCCL on CUDA, gloo on the CPU)
    tp_size: int = option(1, "tensor-parallel ranks: one scheduler process and one device per rank")
    ep_size: int = option(1, "expert-parallel ranks among the tensor-parallel ones (divides --tp-size): "
                             "each holds 1/ep of every MoE layer's experts")
    nnodes: int = option(1, "nodes the tensor-parallel ranks span")
    node_rank: int = option(0, "this node's index; node 0 serves HTTP, the others only run ranks")
    dist_init_addr: Optional[str] = option(None, "host:port where the ranks meet (node 0's address); "
                                                 "None: a free local port (one node)")
    dist_timeout: Optional[int] = option(None, "seconds a collective may wait before failing; None: torch's")
    base_gpu_id: int = option(0, "the first GPU this node's ranks use (rank r uses base + r)")
    dp_size: int = option(1, "data-parallel replicas behind this server, each with its own model copy, "
                             "KV cache and --tp-size devices")
    load_balance_method: str = option("auto", "how requests are spread over the --dp-size replicas: "
                                              + "|".join(LOAD_BALANCE_METHODS))

    # HTTP server
    host: str = option("127.0.0.1", "address the HTTP server listens on")
    port: int = option(30000, "port the HTTP server listens on")
    served_model_name: Optional[str] = option(None, "the model name the API reports and accepts; "
                                                    "None: the model path's name")
    api_key: Optional[str] = option(None, "require 'Authorization: Bearer KEY' on every endpoint but /health")
    chat_template: Optional[str] = option(None, "a Jinja file replacing the model's chat template")

    # Observability and limits
    enable_metrics: bool = option(False, "serve Prometheus metrics on /metrics")
    log_requests: bool = option(False, "log one line per finished request")
    log_requests_level: int = option(1, "1: ids, lengths, finish reason, latency; 2: also the text")
    max_queued_requests: Optional[int] = option(None, "waiting requests beyond this are refused with 503; "
                                                      "None: no limit")
    max_request_body_bytes: int = option(16 << 20, "larger HTTP bodies are refused with 400")
    max_batch_prompts: int = option(1024, "most prompts in one request")
    max_n: int = option(64, "largest n (choices per prompt) in one request")
    admin_api_key: Optional[str] = option(None, "a separate key for the admin endpoints (weights, cache, "
                                                "pause); None: --api-key guards them")

    # Misc
    random_seed: Optional[int] = option(None, "seed for sampling; None: a random seed")
    log_level: str = option("info", "log level of every process: " + "|".join(LOG_LEVELS))
    watchdog_timeout: float = option(300.0, "accepted for SGLang compatibility; not used yet")

    # Extra keys that later issues own; kept so that configs are forward-compatible.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.model_path is None:
            self.model_path = DEFAULT_MODEL
        self._validate()

    def _validate(self) -> None:
        for f in dataclasses.fields(self):
            _check_scalar_type(f.name, getattr(self, f.name), f.type)
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.page_size is not None and self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise ValueError(f"max_total_tokens must be >= 1, got {self.max_total_tokens}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(
                f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}"
            )
        if self.max_running_requests is not None and self.max_running_requests < 1:
            raise ValueError(
                f"max_running_requests must be >= 1, got {self.max_running_requests}"
            )
        if self.chunked_prefill_size is not None and (
            self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1
        ):
            raise ValueError(
                f"chunked_prefill_size must be positive or -1, got {self.chunked_prefill_size}"
            )
        if self.chunked_prefill_size is not None and 0 < self.chunked_prefill_size < (self.page_size or 1):
            # A chunk holds whole pages: a smaller one never admits a long prompt.
            raise ValueError(f"chunked_prefill_size ({self.chunked_prefill_size}) must be at least "
                             f"page_size ({self.page_size})")
        if self.schedule_policy not in ("fcfs", "lpm", "dfs-weight", "random"):
            raise ValueError(
                f"schedule_policy must be fcfs|lpm|dfs-weight|random, got {self.schedule_policy!r}"
            )
        if self.attention_backend not in (None, "torch_native", "triton"):
            raise ValueError(
                f"attention_backend must be torch_native|triton, got {self.attention_backend!r}"
            )
        if self.cuda_graph_max_bs is not None and self.cuda_graph_max_bs < 1:
            raise ValueError(f"cuda_graph_max_bs must be >= 1, got {self.cuda_graph_max_bs}")
        if self.prefill_cuda_graph_max_tokens < 0:
            raise ValueError(f"prefill_cuda_graph_max_tokens must be >= 0, got {self.prefill_cuda_graph_max_tokens}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {'|'.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.chat_template is not None and not Path(self.chat_template).expanduser().is_file():
            raise ValueError(f"chat_template {self.chat_template!r} is not a file; pass a Jinja template file")
        from radixserve.server_args_checks import validate_hicache, validate_lora, validate_parallelism

        validate_parallelism(self)
        validate_lora(self)
        validate_hicache(self)
        self._validate_disaggregation()
        from radixserve.speculative.spec_args import validate_speculative  # torch-free

        validate_speculative(self)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {'|'.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {'|'.join(map(str, QUANTIZATIONS))}, "
                             f"got {self.quantization!r}")
        if self.torchao_config not in TORCHAO_CONFIGS:
            raise ValueError(f"torchao_config must be one of {'|'.join(c for c in TORCHAO_CONFIGS if c)}, "
                             f"got {self.torchao_config!r}")
        if (self.quantization in ("gguf", "w8a8_int8") or (self.torchao_config or "").startswith("int4wo")) \
                and self.resolved_device() != "cpu":
            raise ValueError("quantization=gguf|w8a8_int8 and torchao_config=int4wo-* run on the CPU only "
                             "(torch's int4 and int8 kernels there); on CUDA use quantization=fp8")
        if self.quantization and self.torchao_config:
            raise ValueError("quantization and torchao_config cannot be combined; choose one")
        if (self.quantization or self.torchao_config) and self.enable_deterministic_inference:
            raise ValueError("quantization and torchao_config cannot be combined with "
                             "enable_deterministic_inference (its batch-invariant GEMMs are bfloat16)")
        if self.enable_mixed_chunk and self.enable_deterministic_inference:
            # A decode step inside a mixed batch runs the extend kernels: its
            # numbers would depend on whether a prefill came along.
            raise ValueError("enable_mixed_chunk cannot be combined with enable_deterministic_inference")
        if self.is_embedding and self.enable_lora:
            raise ValueError("is_embedding cannot be combined with enable_lora yet")
        if self.is_embedding and self.disaggregation_mode != "null":
            raise ValueError("is_embedding cannot be combined with disaggregation_mode (an embedding is one prefill)")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        for name, supported in _PARSER_CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in supported:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be one of {'|'.join(supported)}, got {value!r}")

    def _validate_disaggregation(self) -> None:
        from radixserve.disaggregation.config import validate_disaggregation  # torch-free

        validate_disaggregation(self)

    @property
    def disaggregated(self) -> bool:
        return self.disaggregation_mode != "null"

    def hicache_storage_extra_config(self) -> Dict[str, Any]:
        """--hicache-storage-backend-extra-config as a dict ({} when unset)."""
        import json

        raw = self.hicache_storage_backend_extra_config
        if not raw:
            return {}
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"hicache_storage_backend_extra_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("hicache_storage_backend_extra_config must be a JSON object")
        return value

    @property
    def ranks_per_node(self) -> int:
        """Scheduler processes on this node: every replica's tensor-parallel ranks here."""
        return self.dp_size * self.tp_size // self.nnodes

    # ---- device-dependent defaults, resolved in the scheduler process ----
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_page_size(self) -> int:
        """--page-size, or the device's default: on the CPU, pages of 16 keep a request's
        keys in runs that its decode attention reads whole (8% more batch-32 decode
        throughput than single-token pages); on a GPU the kernels take any slot order."""
        if self.page_size is not None:
            return self.page_size
        if self.resolved_device() != "cpu":
            return 1
        chunk = self.chunked_prefill_size
        return min(CPU_PAGE_SIZE, chunk) if chunk is not None and chunk > 0 else CPU_PAGE_SIZE

    def resolved_chunked_prefill_size(self) -> Optional[int]:
        size = self.chunked_prefill_size
        if size is None:  # at least a page (see _validate)
            size = max(8192 if self.resolved_device() == "cuda" else 2048, self.resolved_page_size())
        return None if size == -1 else size

    def resolved_attention_backend(self) -> str:
        if self.attention_backend:
            return self.attention_backend
        return "triton" if self.resolved_device().startswith("cuda") else "torch_native"

    # ---- argparse ----
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """One flag per field, named as in SGLang (--model-path for model_path),
        with the field's help text; an ArgumentDefaultsHelpFormatter parser
        also shows each default."""
        for f in dataclasses.fields(ServerArgs):
            if f.name == "extra":
                continue
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            if f.type in ("bool",) or isinstance(f.default, bool):
                parser.add_argument(flag, action="store_true", default=f.default, help=help_text)
                continue
            parser.add_argument(flag, *_FLAG_ALIASES.get(f.name, ()), dest=f.name, type=_parse_type(f.type),
                                default=f.default, choices=_PARSER_CHOICES.get(f.name), help=help_text,
                                nargs=f.metadata.get("nargs"))

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})

    @classmethod
    def from_kwargs(cls, model_path: Optional[str] = None, **kwargs) -> "ServerArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown server argument(s): {', '.join(unknown)}")
        return cls(model_path=model_path, **kwargs)


def configure_logging(log_level: str) -> None:
    """The process's log format and level (log_level is already validated)."""
    logging.basicConfig(level=log_level.upper(), format="[%(asctime)s] %(levelname)s %(message)s")


# The output parsers' names, checked at start-up so a typo fails before the model loads.
_PARSER_CHOICES = {
    "disaggregation_mode": DISAGGREGATION_MODES,
    "tool_call_parser": SUPPORTED_TOOL_PARSERS,
    "reasoning_parser": SUPPORTED_REASONING_PARSERS,
}


# Other spellings SGLang accepts for the same flag.
_FLAG_ALIASES = {
    "tp_size": ("--tensor-parallel-size", "--tp"),
    "ep_size": ("--expert-parallel-size", "--ep"),
    "dp_size": ("--data-parallel-size", "--dp"),
}


_SCALAR_TYPES = {"int": (numbers.Integral,), "float": (numbers.Real,), "bool": (bool,), "str": (str,)}


def _annotation(type_name: Any) -> Tuple[str, bool]:
    """A field's annotation (a string: the module has postponed annotations) as
    (the type's name, whether None is allowed): "Optional[int]" -> ("int", True)."""
    name = str(type_name)
    optional = name.startswith("Optional[")
    return (name[len("Optional["):-1] if optional else name), optional


def _check_scalar_type(name: str, value: Any, type_name: Any) -> None:
    """A scalar option holds a value of its type: Engine(page_size="16") is refused here,
    naming the field, instead of failing later as a TypeError in a comparison."""
    base, optional = _annotation(type_name)
    accepted = _SCALAR_TYPES.get(base)
    if accepted is None or (value is None and optional):
        return
    if isinstance(value, bool) and base != "bool" or not isinstance(value, accepted):
        raise ValueError(f"{name} must be {'None or ' if optional else ''}{base}, "
                         f"got {value!r} ({type(value).__name__})")


def _parse_type(type_name: Any):
    """The command line's converter for a field's values (bool flags are store_true)."""
    return {"int": int, "float": float}.get(_annotation(type_name)[0], str)
