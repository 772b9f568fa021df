"""ServerArgs: the one configuration object, shared by the Engine and the server.

Flag names follow SGLang so that an SGLang user can switch by changing only the
command name.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from radixserve.parsers import SUPPORTED_REASONING_PARSERS, SUPPORTED_TOOL_PARSERS

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


@dataclass
class ServerArgs:
    # Model and tokenizer
    model_path: Optional[str] = None  # None: the embedded default model
    tokenizer_path: Optional[str] = None
    load_format: str = "auto"  # auto | dummy
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    context_length: Optional[int] = None
    trust_remote_code: bool = False

    # Memory
    page_size: int = 1
    max_total_tokens: Optional[int] = None
    mem_fraction_static: Optional[float] = None
    max_running_requests: Optional[int] = None

    # Scheduling
    chunked_prefill_size: Optional[int] = None  # None: device default; -1 disables
    schedule_policy: str = "fcfs"  # fcfs | lpm | dfs-weight | random
    disable_radix_cache: bool = False
    max_prefill_tokens: int = 16384
    schedule_conservativeness: float = 1.0
    stream_interval: int = 1
    incremental_streaming_output: bool = False

    # Structured outputs
    grammar_backend: str = "xgrammar"  # xgrammar | none
    constrained_json_disable_any_whitespace: bool = False
    tool_call_parser: Optional[str] = None  # hermes | qwen25 | llama3; None: hermes when tools are sent
    reasoning_parser: Optional[str] = None  # qwen3 | deepseek-r1; None: no reasoning split

    # Kernels and the GPU fast path
    attention_backend: Optional[str] = None  # torch_native | triton; None: triton on CUDA
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: Optional[int] = None  # None: 256, or fewer when memory is short
    disable_overlap_schedule: bool = False
    # Bit-identical outputs whatever else is batched, however the prefill was
    # chunked and whether the prefix came from the radix cache (slower kernels).
    enable_deterministic_inference: bool = False

    # HTTP server
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: Optional[str] = None  # default: the model path's name
    api_key: Optional[str] = None
    chat_template: Optional[str] = None  # a Jinja file replacing the model's template

    # Observability and limits
    enable_metrics: bool = False
    log_requests: bool = False
    log_requests_level: int = 1  # 1: ids, lengths, reason, latency; 2: also the text
    max_queued_requests: Optional[int] = None
    max_request_body_bytes: int = 16 << 20
    max_batch_prompts: int = 1024
    max_n: int = 64
    admin_api_key: Optional[str] = None

    # Misc
    random_seed: Optional[int] = None
    log_level: str = "info"
    watchdog_timeout: float = 300.0

    # Extra keys that later issues own; kept so that configs are forward-compatible.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.model_path is None:
            self.model_path = DEFAULT_MODEL
        self._validate()

    def _validate(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.page_size < 1:
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
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        for name, supported in _PARSER_CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in supported:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be one of {'|'.join(supported)}, got {value!r}")

    # ---- device-dependent defaults, resolved in the scheduler process ----
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_chunked_prefill_size(self) -> Optional[int]:
        size = self.chunked_prefill_size
        if size is None:
            size = 8192 if self.resolved_device() == "cuda" else 2048
        return None if size == -1 else size

    def resolved_attention_backend(self) -> str:
        if self.attention_backend:
            return self.attention_backend
        return "triton" if self.resolved_device().startswith("cuda") else "torch_native"

    # ---- argparse ----
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        d = ServerArgs.__dataclass_fields__
        for f in dataclasses.fields(ServerArgs):
            if f.name == "extra":
                continue
            flag = "--" + f.name.replace("_", "-")
            default = d[f.name].default
            if f.type in ("bool",) or isinstance(default, bool):
                parser.add_argument(flag, action="store_true", default=default)
                continue
            parser.add_argument(flag, type=_parse_type(f.type), default=default,
                                choices=_PARSER_CHOICES.get(f.name))

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


# The output parsers' names, checked at start-up so a typo fails before the model loads.
_PARSER_CHOICES = {
    "tool_call_parser": SUPPORTED_TOOL_PARSERS,
    "reasoning_parser": SUPPORTED_REASONING_PARSERS,
}


def _parse_type(type_name: str):
    name = str(type_name)
    if "int" in name:
        return int
    if "float" in name:
        return float
    return str
