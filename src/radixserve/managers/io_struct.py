"""Every message that crosses a process boundary (pickled over ZMQ)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from radixserve.sampling.sampling_params import SamplingParams

# (logprob, token_id) pairs; text is added by the TokenizerManager when asked.
LogprobList = List[Tuple[float, int]]


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class ControlReq:
    """A control request to the scheduler; its reply carries the same request_id,
    so each caller gets its own answer whatever the order of replies."""

    request_id: str = field(default_factory=new_request_id, kw_only=True)


@dataclass
class ControlOut:
    """The scheduler's reply to the ControlReq with this request_id (from
    data-parallel replica dp_rank: each replica answers every control request)."""

    request_id: str = field(default="", kw_only=True)
    dp_rank: int = field(default=0, kw_only=True)


@dataclass
class BootstrapInfo:
    """Where a disaggregated request's other half is: the prefill server's
    bootstrap server (host, port) and the room, the id both halves share."""

    host: str
    port: int
    room: int


@dataclass
class TokenizedGenerateReqInput:
    """TokenizerManager -> Scheduler: one request (one of n samples)."""

    rid: str
    input_ids: List[int]
    sampling_params: SamplingParams
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    lora_id: Optional[int] = None  # the adapter's id for this load of it; None: the base model
    # A vision-language model's images (multimodal/inputs.py MultimodalInputs); None: text only
    mm_inputs: Optional[Any] = None
    bootstrap: Optional[BootstrapInfo] = None  # prefill/decode disaggregation: the pairing


@dataclass
class ReqOutput:
    """One request's news since the last message about it."""

    rid: str
    new_token_ids: List[int]
    finished_reason: Optional[Dict[str, Any]]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # {device, host, storage}: where the cached tokens came from (hierarchical cache only).
    cached_tokens_details: Optional[Dict[str, int]] = None
    # Detokenizer settings, constant per request.
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    # Characters to hold back while streaming, so a stop string that spans
    # tokens is never shown partially.
    stop_hold_back: int = 0
    output_token_logprobs: Optional[LogprobList] = None
    output_top_logprobs: Optional[List[LogprobList]] = None
    input_token_logprobs: Optional[List[Tuple[Optional[float], int]]] = None
    input_top_logprobs: Optional[List[Optional[LogprobList]]] = None
    # Filled by the Detokenizer: text added since the last message.
    new_text: str = ""
    # Seconds from arrival at the scheduler to its first prefill (sent once).
    queue_time: Optional[float] = None
    # time.monotonic() (system-wide on Linux) when the first output token was sampled.
    first_token_at: Optional[float] = None
    # The weights that produced it (a request never spans a weight update).
    weight_version: str = "default"
    # An embedding server's result: the pooled, L2-normalized vector (sent once, when finished).
    embedding: Optional[List[float]] = None
    # With speculative decoding: (verify steps, drafts verified, drafts accepted) so far.
    spec: Optional[Tuple[int, int, int]] = None


@dataclass
class BatchTokenIDOut:
    """Scheduler -> Detokenizer."""

    outputs: List[ReqOutput]


@dataclass
class BatchStrOut:
    """Detokenizer -> TokenizerManager."""

    outputs: List[ReqOutput]


@dataclass
class SchedulerStats:
    """Scheduler -> TokenizerManager, with every log line: gauges for /metrics."""

    num_running_reqs: int
    num_queued_reqs: int
    token_usage: float
    cache_hit_rate: float
    gen_throughput: float
    dp_rank: int = 0  # the data-parallel replica that sent it
    hicache: Optional[Dict[str, Any]] = None  # the hierarchical cache's counters (tier_stats), when on
    disaggregation: Optional[Dict[str, Any]] = None  # KV transfer counters (prefill/decode disaggregation)
    spec_accept_length: Optional[float] = None  # tokens per verify step so far, with speculative decoding


@dataclass
class AbortReq:
    rid: Optional[str] = None
    abort_all: bool = False


@dataclass
class GetServerInfoReq(ControlReq):
    pass


@dataclass
class GetServerInfoOut(ControlOut):
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class FlushCacheReq(ControlReq):
    flush_storage: bool = False  # also the hierarchical cache's storage tier


@dataclass
class UpdateWeightsFromDiskReq(ControlReq):
    model_path: str
    load_format: Optional[str] = None
    weight_version: Optional[str] = None
    abort_all_requests: bool = False


@dataclass
class UpdateWeightsFromTensorReq(ControlReq):
    """named_tensors, pickled with torch's ForkingPickler: tensors travel as
    shared-memory handles, not copies (the one large-payload exception).
    With tp or dp > 1, a list: one pickle per rank (a handle opens in one
    process), indexed by dp_rank * tp_size + tp_rank."""

    serialized_named_tensors: Any  # bytes, or List[bytes] indexed by rank
    flush_cache: bool = True
    weight_version: Optional[str] = None
    abort_all_requests: bool = False


@dataclass
class UpdateWeightsOut(ControlOut):
    success: bool
    message: str = ""
    weight_version: str = ""


@dataclass
class PauseGenerationReq(ControlReq):
    mode: str = "in_place"  # in_place: running requests wait, keeping their KV | abort: end them


@dataclass
class ContinueGenerationReq(ControlReq):
    pass


@dataclass
class GenerationControlOut(ControlOut):
    success: bool
    message: str = ""


@dataclass
class GetWeightsByNameReq(ControlReq):
    name: str
    truncate_size: int = 100


@dataclass
class GetWeightsByNameOut(ControlOut):
    values: Optional[list] = None
    error: str = ""


@dataclass
class InitWeightsUpdateGroupReq(ControlReq):
    """Join a process group with a trainer (rank 0) as rank rank_offset."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: Optional[str] = None  # None: nccl on CUDA, gloo on CPU


@dataclass
class UpdateWeightsFromDistributedReq(ControlReq):
    """Receive these weights (Hugging Face names) as broadcasts from rank 0, in this order."""

    names: List[str]
    dtypes: List[Any]  # "bfloat16", "torch.float32" or torch.dtype
    shapes: List[List[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    weight_version: Optional[str] = None
    abort_all_requests: bool = False


@dataclass
class DestroyWeightsUpdateGroupReq(ControlReq):
    group_name: str = "weight_update_group"


@dataclass
class WeightsUpdateGroupOut(ControlOut):
    success: bool
    message: str = ""


@dataclass
class ReleaseMemoryOccupationReq(ControlReq):
    pass


@dataclass
class ResumeMemoryOccupationReq(ControlReq):
    pass


@dataclass
class MemoryOccupationOut(ControlOut):
    success: bool
    message: str = ""
    num_bytes: int = 0  # released by a release, allocated again by a resume


@dataclass
class LoadLoRAAdapterReq(ControlReq):
    lora_name: str
    lora_path: str
    lora_id: int  # unique per load (the front end counts)
    pinned: bool = False


@dataclass
class UnloadLoRAAdapterReq(ControlReq):
    lora_name: str
    lora_id: int


@dataclass
class LoRAAdapterOut(ControlOut):
    success: bool
    message: str = ""


@dataclass
class FlushCacheOut(ControlOut):
    success: bool
    message: str = ""


@dataclass
class SchedulerReady:
    """Scheduler -> parent once the model is loaded: what the front end must know."""

    max_total_num_tokens: int
    max_running_requests: int
    context_length: int
    vocab_size: int
    chunked_prefill_size: Optional[int]
    device: str
    # --is-embedding: the vector's size, and the truncations `dimensions` may ask for
    # (layers/pooler.py: matryoshka_dimensions; None: none).
    hidden_size: int = 0
    matryoshka_dimensions: Optional[List[int]] = None
