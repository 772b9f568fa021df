"""A request's state in the TokenizerManager and the result dicts built from
the scheduler's updates: text and ids (cumulative or incremental), meta_info,
logprobs with their token texts, speculative-decoding counters, embeddings."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional

from radixserve.managers import io_struct as io
from radixserve.managers.generate_input import SingleRequest


@dataclass
class ReqState:
    req: SingleRequest
    prompt_ids: List[int]
    created: float
    text: str = ""
    output_ids: List[int] = field(default_factory=list)
    pending: Deque[io.ReqOutput] = field(default_factory=deque)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False
    meta: Dict[str, Any] = field(default_factory=dict)
    last_output_at: Optional[float] = None


class OutputBuilder:
    """Folds each update into its request's state and builds the result dict."""

    def __init__(self, tokenizer: Any, incremental_streaming_output: bool) -> None:
        self.tokenizer = tokenizer
        self.incremental = incremental_streaming_output
        self._token_texts: Dict[int, str] = {}  # token id -> its text, for logprobs

    def apply(self, state: ReqState, out: io.ReqOutput) -> Dict[str, Any]:
        """Fold one update into the request's state and build the result dict."""
        incremental = self.incremental and state.req.stream
        state.text += out.new_text
        state.output_ids.extend(out.new_token_ids)
        meta = state.meta
        meta.update(
            id=state.req.rid, prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens, finish_reason=out.finished_reason,
            weight_version=out.weight_version, e2e_latency=time.monotonic() - state.created,
        )
        if out.cached_tokens_details is not None:
            meta["cached_tokens_details"] = out.cached_tokens_details
        if out.spec is not None:
            verify_ct, drafts, accepted = out.spec
            meta.update(spec_verify_ct=verify_ct,
                        spec_accept_length=out.completion_tokens / verify_ct if verify_ct else 0.0,
                        spec_accept_rate=accepted / drafts if drafts else 0.0)
        if state.req.return_logprob:
            self._add_logprobs(state, out)
        result = {
            "text": out.new_text if incremental else state.text,
            "output_ids": list(out.new_token_ids) if incremental else list(state.output_ids),
            "meta_info": dict(meta),
        }
        if out.embedding is not None:
            result["embedding"] = out.embedding
        return result

    def _add_logprobs(self, state: ReqState, out: io.ReqOutput) -> None:
        meta, with_text = state.meta, state.req.return_text_in_logprobs
        meta.setdefault("output_token_logprobs", [])
        meta["output_token_logprobs"] += self._with_text(out.output_token_logprobs or [], with_text)
        if state.req.top_logprobs_num > 0:
            meta.setdefault("output_top_logprobs", [])
            meta["output_top_logprobs"] += [
                self._with_text(top, with_text) for top in (out.output_top_logprobs or [])
            ]
        if out.input_token_logprobs is not None and state.req.logprob_start_len >= 0:
            meta["input_token_logprobs"] = self._with_text(out.input_token_logprobs, with_text)
            if state.req.top_logprobs_num > 0:
                meta["input_top_logprobs"] = [
                    None if top is None else self._with_text(top, with_text)
                    for top in (out.input_top_logprobs or [])
                ]

    def _with_text(self, pairs, with_text: bool) -> list:
        if not with_text:
            return [(lp, tid, None) for lp, tid in pairs]
        return [(lp, tid, self._token_text(tid)) for lp, tid in pairs]

    def _token_text(self, tid: int) -> str:
        """One token's text, cached: top logprobs may name up to the whole
        vocabulary per step, and this runs on the event loop."""
        text = self._token_texts.get(tid)
        if text is None:
            text = self._token_texts[tid] = self.tokenizer.decode([tid])
        return text
