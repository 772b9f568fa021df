"""Every message that crosses a process boundary (pickled over ZMQ)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from radixserve.sampling.sampling_params import SamplingParams

# (logprob, token_id) pairs; text is added by the TokenizerManager when asked.
LogprobList = List[Tuple[float, int]]


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


@dataclass
class ReqOutput:
    """One request's news since the last message about it."""

    rid: str
    new_token_ids: List[int]
    finished_reason: Optional[Dict[str, Any]]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
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


@dataclass
class BatchTokenIDOut:
    """Scheduler -> Detokenizer."""

    outputs: List[ReqOutput]


@dataclass
class BatchStrOut:
    """Detokenizer -> TokenizerManager."""

    outputs: List[ReqOutput]


@dataclass
class AbortReq:
    rid: Optional[str] = None
    abort_all: bool = False


@dataclass
class GetServerInfoReq:
    pass


@dataclass
class GetServerInfoOut:
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class FlushCacheReq:
    pass


@dataclass
class FlushCacheOut:
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
