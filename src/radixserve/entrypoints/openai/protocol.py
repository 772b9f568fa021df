"""OpenAI request bodies. Unknown fields are accepted (real clients send fields
we do not use) and logged once; known fields are type-checked by pydantic in
strict mode (a JSON boolean is a boolean, "2" is not an integer), with OpenAI's
ranges; SamplingParams checks the sampling values after them."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Literal, Optional, Union

import json

from pydantic import BaseModel, ConfigDict, Field

from radixserve.constrained.xgrammar_backend import ANY_JSON
from radixserve.managers.validation import INT64_MAX, SEED_RANGE, FieldError

# OpenAI's caps on top logprobs per token: `logprobs` on /v1/completions and
# `top_logprobs` on chat. They also bound the size of a reply.
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20

logger = logging.getLogger(__name__)
_logged_unknown: set = set()


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class JsonSchemaFormat(StrictModel):
    name: str = "response"
    schema_: Dict[str, Any] = Field(alias="schema")
    strict: bool = False


class ResponseFormat(StrictModel):
    type: str  # text | json_object | json_schema
    json_schema: Optional[JsonSchemaFormat] = None

    def as_json_schema(self) -> Optional[str]:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ANY_JSON
        if self.type == "json_schema":
            if self.json_schema is None:
                raise FieldError("response_format", "response_format.json_schema is required for type json_schema")
            return json.dumps(self.json_schema.schema_)
        raise FieldError("response_format",
                         f"response_format.type must be text, json_object or json_schema, got {self.type!r}"[:300])


class SGLangExtras(BaseModel):
    """SGLang sampling parameters accepted in the body (the client's extra_body)."""

    model_config = ConfigDict(extra="allow", strict=True)

    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    ignore_eos: bool = False
    stop_token_ids: Optional[List[int]] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    stop_regex: Union[str, List[str], None] = None
    rid: Optional[str] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    json_schema: Optional[str] = None
    # The data-parallel replica to serve it (data_parallel_rank: the older name,
    # which SGLang's gateway adds in its --dp-aware mode).
    routed_dp_rank: Optional[int] = None
    data_parallel_rank: Optional[int] = None
    # usage.prompt_tokens_details.cached_tokens_details: {device, host, storage}
    # (with --enable-hierarchical-cache)
    return_cached_tokens_details: bool = False
    # Prefill/decode disaggregation: SGLang's gateway adds these to both halves of a request.
    bootstrap_host: Optional[str] = None
    bootstrap_port: Optional[int] = None
    bootstrap_room: Optional[int] = None

    def bootstrap_fields(self) -> Dict[str, Any]:
        return {"bootstrap_host": self.bootstrap_host, "bootstrap_port": self.bootstrap_port,
                "bootstrap_room": self.bootstrap_room}

    @property
    def requested_dp_rank(self) -> Optional[int]:
        if None not in (self.routed_dp_rank, self.data_parallel_rank) and self.routed_dp_rank != self.data_parallel_rank:
            raise FieldError("routed_dp_rank", f"routed_dp_rank ({self.routed_dp_rank}) and data_parallel_rank "
                                               f"({self.data_parallel_rank}) disagree")
        return self.data_parallel_rank if self.routed_dp_rank is None else self.routed_dp_rank

    def log_unknown_fields(self) -> None:
        for name in (self.model_extra or {}):
            key = (type(self).__name__, name)
            if key not in _logged_unknown:
                _logged_unknown.add(key)
                logger.info("ignoring unsupported field %r in %s", name, type(self).__name__)


class CommonRequest(SGLangExtras):
    model: Optional[str] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = Field(1, ge=1)  # <= --max-n is checked with the other sampling params
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None
    response_format: Optional[ResponseFormat] = None

    def sampling_params(self, max_new_tokens: Optional[int]) -> Dict[str, Any]:
        params: Dict[str, Any] = {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": self.top_k, "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "min_new_tokens": self.min_tokens, "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens, "no_stop_trim": self.no_stop_trim,
            "spaces_between_special_tokens": self.spaces_between_special_tokens, "n": self.n,
        }
        if max_new_tokens is not None:
            params["max_new_tokens"] = max_new_tokens
        if self.stop is not None:
            params["stop"] = self.stop
        if self.stop_regex is not None:
            params["stop_regex"] = self.stop_regex
        if self.stop_token_ids:
            params["stop_token_ids"] = self.stop_token_ids
        if self.seed is not None:
            params["sampling_seed"] = self.seed
        if self.logit_bias:
            params["logit_bias"] = self.logit_bias
        schema = self.response_format.as_json_schema() if self.response_format else None
        for key, value in (("json_schema", schema or self.json_schema), ("regex", self.regex), ("ebnf", self.ebnf)):
            if value is not None:
                params[key] = value
        return params


class CompletionRequest(CommonRequest):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = Field(16, ge=0, le=INT64_MAX)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str = "text"
    text: str = ""


class FunctionCallIn(BaseModel):
    """A call in an earlier assistant message; arguments are a JSON string as
    OpenAI sends them (some clients send the object itself)."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    arguments: Union[str, Dict[str, Any]] = "{}"


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    id: Optional[str] = None
    type: str = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: Union[str, List[TextPart], None] = None
    tool_calls: Optional[List[ToolCallIn]] = None  # assistant messages
    tool_call_id: Optional[str] = None  # tool messages
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content if part.type == "text")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None  # a JSON schema of the arguments object
    strict: Optional[bool] = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionRequest(CommonRequest):
    messages: List[ChatMessage]
    max_tokens: Optional[int] = Field(None, ge=0, le=INT64_MAX)
    max_completion_tokens: Optional[int] = Field(None, ge=0, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    tools: Optional[List[Tool]] = None
    # "auto" | "none" | "required" | {"type": "function", "function": {"name": ...}};
    # checked in entrypoints/openai/tools.py for messages that name the field.
    tool_choice: Union[str, Dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    separate_reasoning: bool = True  # SGLang: split <think> off into reasoning_content
