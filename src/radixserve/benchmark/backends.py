"""Streaming HTTP requests for each backend, timed as they arrive.

radixserve and sglang stream `/generate` (cumulative text, `meta_info` with the
token counts); openai and vllm stream `/v1/completions`; openai-chat streams
`/v1/chat/completions`. OpenAI streams ask for a final usage chunk
(`stream_options.include_usage`), which carries the server's token counts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, Optional

from radixserve.benchmark.datasets import BenchRequest
from radixserve.benchmark.metrics import RequestOutput

BACKENDS = ("radixserve", "sglang", "openai", "openai-chat", "vllm")
NATIVE_BACKENDS = ("radixserve", "sglang")
CHAT_BACKENDS = ("openai-chat",)


@dataclass
class BackendConfig:
    backend: str
    base_url: str
    model: Optional[str]  # the name sent to OpenAI routes
    ignore_eos: bool = True

    @property
    def url(self) -> str:
        if self.backend in NATIVE_BACKENDS:
            return self.base_url + "/generate"
        if self.backend in CHAT_BACKENDS:
            return self.base_url + "/v1/chat/completions"
        return self.base_url + "/v1/completions"

    def body(self, req: BenchRequest) -> Dict[str, Any]:
        if req.use_ids and self.backend in CHAT_BACKENDS:
            raise ValueError("--dataset-name random-ids needs a backend that accepts token ids "
                             "(radixserve, sglang, openai, vllm), not openai-chat")
        if self.backend in NATIVE_BACKENDS:
            params: Dict[str, Any] = {"max_new_tokens": req.output_len, "temperature": 0.0}
            if self.ignore_eos:
                params["ignore_eos"] = True
            prompt = {"input_ids": req.prompt_ids} if req.use_ids else {"text": req.prompt}
            lora = {"lora_path": req.lora_name} if req.lora_name else {}
            return {**prompt, "sampling_params": params, "stream": True, **lora}
        body: Dict[str, Any] = {"model": req.lora_name or self.model, "max_tokens": req.output_len, "temperature": 0.0,
                                "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True  # an SGLang / vLLM extra, in the body
        if self.backend in CHAT_BACKENDS:
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt_ids if req.use_ids else req.prompt
        return body


async def sse_events(response: Any) -> AsyncIterator[Dict[str, Any]]:
    """The JSON payloads of `data:` lines of an aiohttp response, up to `data: [DONE]`."""
    async for line in response.content:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[len(b"data:"):].strip()
        if payload == b"[DONE]":
            return
        yield json.loads(payload)


class StreamTimer:
    """Records when tokens arrive: the first (TTFT) and the gaps between chunks (ITL)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: Optional[float] = None
        self.last: Optional[float] = None
        self.gaps: list = []

    def token_chunk(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now

    def finish(self, out: RequestOutput) -> None:
        end = time.perf_counter()
        out.latency = end - self.start
        out.ttft = (self.first if self.first is not None else end) - self.start
        out.itl = self.gaps


async def send_request(session: Any, cfg: BackendConfig, req: BenchRequest) -> RequestOutput:
    """Stream one request over an aiohttp session; failures are recorded in the
    result, never raised."""
    out = RequestOutput(prompt_len=req.prompt_len)
    try:
        body = cfg.body(req)
        timer = StreamTimer()
        async with session.post(cfg.url, json=body) as response:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                out.error = f"HTTP {response.status}: {text[:500]}"
                return out
            if cfg.backend in NATIVE_BACKENDS:
                await _read_native(response, timer, out)
            else:
                await _read_openai(response, timer, out, chat=cfg.backend in CHAT_BACKENDS)
        timer.finish(out)
        out.success = True
    except Exception as e:  # a benchmark reports failed requests and carries on
        out.error = f"{type(e).__name__}: {e}"
    return out


async def _read_native(response: Any, timer: StreamTimer, out: RequestOutput) -> None:
    seen_tokens = 0
    async for event in sse_events(response):
        meta = event.get("meta_info", {})
        tokens = meta.get("completion_tokens")
        # A chunk with new tokens; servers without counts send a chunk per step.
        if tokens is None or tokens > seen_tokens:
            timer.token_chunk()
        out.text = event.get("text", out.text)
        if tokens is not None:
            seen_tokens = tokens
            out.output_len = tokens
            out.prompt_len = meta.get("prompt_tokens", out.prompt_len)
            out.cached_tokens = meta.get("cached_tokens")
            out.counts_reported = True


async def _read_openai(response: Any, timer: StreamTimer, out: RequestOutput, chat: bool) -> None:
    pieces = []
    async for event in sse_events(response):
        usage = event.get("usage")
        if usage:
            out.prompt_len = usage.get("prompt_tokens", out.prompt_len)
            out.output_len = usage.get("completion_tokens", 0)
            details = usage.get("prompt_tokens_details") or {}
            out.cached_tokens = details.get("cached_tokens")
            out.counts_reported = True
        for choice in event.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            # Only chunks carrying text are tokens: the chat role chunk and the
            # finish chunk come with no content.
            if text:
                timer.token_chunk()
                pieces.append(text)
    out.text = "".join(pieces)
