"""The body of SGLang's native /generate: every field of sglang 0.5.23's
GenerateReqInput is known here, so a request forwarded by SGLang's gateway
(which adds fields of its own) or sent by SGLang's frontend is understood.

Three kinds of field:
- IMPLEMENTED: passed on to GenerateReqInput, which checks them;
- IGNORED: hints that change nothing in a single replica's answer (logging,
  metrics, routing keys, tracing); any value is accepted;
- DEFAULT_ONLY: features radixserve does not have. Their default value (or
  a per-prompt list of defaults) is accepted and ignored; anything else is a
  400 naming the field, rather than a silently different answer.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from radixserve.managers.validation import FieldError

IMPLEMENTED = ("text", "input_ids", "sampling_params", "rid", "return_logprob", "logprob_start_len",
               "top_logprobs_num", "return_text_in_logprobs", "stream", "lora_path", "image_data",
               "bootstrap_host", "bootstrap_port", "bootstrap_room")

IGNORED = (
    "log_metrics", "no_logs", "custom_labels",  # logging and metric labels
    "routing_key", "conversation_id",  # the gateway's routing hints, already used by it
    "external_trace_header", "received_time", "http_worker_ipc",  # tracing and SGLang's internal plumbing
)

# name -> default in sglang 0.5.23 (False for flags, None for optional values).
DEFAULT_ONLY: Dict[str, Any] = {
    "session_id": None, "input_embeds": None, "video_data": None, "audio_data": None,
    "mm_hashes": None, "mm_content_hashes": None, "use_audio_in_video": False, "video_config": None,
    "watermark": None, "token_ids_logprob": None, "return_sampling_mask": None, "sampling_logprobs_mode": None,
    "return_flat_raw_top_logprobs": False, "return_flat_raw_output_top_logprobs": False,
    "return_flat_raw_top_logprobs_b64": False, "return_hidden_states": False, "return_routed_experts": False,
    "routed_experts_start_len": 0, "return_indexer_topk": False, "modalities": None, "session_params": None,
    "lora_id": None, "custom_logit_processor": None, "positional_embed_overrides": None,
    "bootstrap_pair_key": None,
    "decode_tp_size": None, "disagg_prefill_dp_rank": None, "background": False, "require_reasoning": False,
    "max_thinking_tokens": None, "priority": None, "extra_key": None, "return_bytes": False,
    "return_entropy": False, "return_prompt_token_ids": False, "need_wait_for_mm_inputs": None,
    "num_items_assigned": None, "encoder_urls": None, "max_dynamic_patch": None, "min_dynamic_patch": None,
    "image_max_dynamic_patch": None, "video_max_dynamic_patch": None, "images_config": None,
    "mm_processor_kwargs": None, "multi_item_delimiter_indices": None, "token_indices_to_pool": None,
    "cache_salt": None, "kv_hints": None,
}

# The data-parallel replica a request asks for (data_parallel_rank is the older
# name, which SGLang's gateway sends in its --dp-aware mode): routed_dp_rank.
DP_RANK_FIELDS = ("routed_dp_rank", "data_parallel_rank")

# Not a GenerateReqInput field, but SGLang's gateway adds it (as null) to every
# /generate it forwards; SGLang's server ignores it, and so do we.
GATEWAY_EXTRAS = ("model",)


def known_fields() -> frozenset:
    """Every name /generate understands (the test compares it with sglang's class)."""
    return frozenset((*IMPLEMENTED, *IGNORED, *DEFAULT_ONLY, *DP_RANK_FIELDS))


def implemented_fields(body: Dict[str, Any], dp_size: int = 1) -> Dict[str, Any]:
    """The fields of a /generate body that GenerateReqInput takes (the replica
    asked for under its name routed_dp_rank); every other field is checked
    here (unknown: 400; unsupported and not default: 400)."""
    routed = {"routed_dp_rank": routed_dp_rank(body, dp_size)}
    for name, value in body.items():
        if name in IMPLEMENTED or name in IGNORED or name in GATEWAY_EXTRAS or name in DP_RANK_FIELDS:
            continue
        if name in DEFAULT_ONLY:
            _check_default(name, value, DEFAULT_ONLY[name])
        else:
            unknown = sorted(str(k) for k in body if k not in known_fields() and k not in GATEWAY_EXTRAS)
            raise FieldError(name, f"unknown field(s) in /generate: {', '.join(unknown)}"[:500])
    return {**{k: v for k, v in body.items() if k in IMPLEMENTED}, **routed}


def routed_dp_rank(body: Dict[str, Any], dp_size: int) -> Optional[int]:
    """The replica a body asks for under either name (checked), or None."""
    ranks = {name: body[name] for name in DP_RANK_FIELDS if body.get(name) is not None}
    for name, value in ranks.items():
        _check_dp_rank(name, value, dp_size)
    if len(set(ranks.values())) > 1:
        raise FieldError("routed_dp_rank", f"routed_dp_rank and data_parallel_rank disagree: {ranks}")
    return next(iter(ranks.values()), None)


def _check_default(name: str, value: Any, default: Any) -> None:
    """The default itself, or one default per prompt (SGLang's batch form)."""
    values = value if isinstance(value, list) and default is not None else [value]
    if all(v is None or (v == default and type(v) is type(default)) for v in values):
        return
    raise FieldError(name, f"'{name}' is not supported by radixserve; leave it out or send "
                           f"{'null' if default is None else str(default).lower()}")


def _check_dp_rank(name: str, value: Any, dp_size: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < dp_size:
        raise FieldError(name, f"'{name}' must be a data-parallel rank in [0, {dp_size}) "
                               f"(this server has dp_size {dp_size}), got {value!r}"[:300])
