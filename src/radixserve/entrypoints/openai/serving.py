"""/v1/completions and /v1/chat/completions on top of the TokenizerManager."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional

from radixserve.entrypoints.openai.chat_output import (
    ChoiceStream,
    OutputParsing,
    choice_finish_reason,
    parse_reply,
    reply_message,
)
from radixserve.entrypoints.openai.chat_images import image_fields, renamed_image_error, take_images
from radixserve.entrypoints.openai.chat_template import ChatTemplate, think_opened
from radixserve.entrypoints.openai.protocol import ChatCompletionRequest, CommonRequest, CompletionRequest
from radixserve.entrypoints.openai.tools import ToolPlan, forced_call_ebnf, plan_tools, tool_dicts
from radixserve.managers.generate_input import GenerateReqInput
from radixserve.managers.tokenizer_manager import PreparedGenerate, TokenizerManager
from radixserve.managers.validation import FieldError

# Our names for fields OpenAI names differently (prompt fields, logprob counts
# and max_tokens are resolved per request in _openai_field).
_OPENAI_NAMES = {"min_new_tokens": "min_tokens", "sampling_seed": "seed"}


class ModelNotFound(Exception):
    pass


def finish_reason(meta: Dict[str, Any]) -> Optional[str]:
    reason = meta.get("finish_reason")
    return None if reason is None else reason["type"]


def usage(results: List[Dict[str, Any]], n: int, cached_details: bool = False) -> Dict[str, Any]:
    """Prompt tokens count once per prompt (not per sample), as OpenAI does.
    cached_details: add where the cached tokens came from (hierarchical cache)."""
    prompt = sum(r["meta_info"]["prompt_tokens"] for r in results[::n])
    cached = sum(r["meta_info"]["cached_tokens"] for r in results[::n])
    completion = sum(r["meta_info"]["completion_tokens"] for r in results)
    details: Dict[str, Any] = {"cached_tokens": cached}
    tiers = [r["meta_info"].get("cached_tokens_details") for r in results[::n]]
    if cached_details and all(tiers):
        details["cached_tokens_details"] = {k: sum(t[k] for t in tiers) for k in ("device", "host", "storage")}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": details}


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@dataclass
class ChatPlan:
    """A checked chat request: what to generate and how to read the replies."""

    gen: GenerateReqInput
    parsing: OutputParsing
    prepared: Optional[PreparedGenerate] = None  # set by OpenAIServing.prepare


class OpenAIServing:
    def __init__(self, tm: TokenizerManager, served_model_name: str) -> None:
        self.tm = tm
        self.model = served_model_name
        self.template = ChatTemplate(tm.tokenizer)

    def check_model(self, name: Optional[str]) -> Optional[str]:
        """The LoRA adapter a request's `model` names ("base:adapter" or the
        adapter's name, as SGLang accepts), None for the base model."""
        if name is None or name == self.model:
            return None
        registry = self.tm.lora
        base, sep, adapter = name.rpartition(":")
        if registry is not None and sep and base == self.model:
            if adapter not in registry.by_name:
                raise FieldError("model", f"model: unknown LoRA adapter {adapter!r} in {name!r} (loaded: "
                                          f"{', '.join(sorted(registry.by_name)) or 'none'})")
            return adapter
        if registry is not None and name in registry.by_name:
            return name
        raise ModelNotFound(f"The model '{name}' does not exist; this server serves '{self.model}'")

    async def prepare(self, req: CommonRequest, gen: GenerateReqInput) -> PreparedGenerate:
        """Check and tokenize gen (TokenizerManager.prepare); a bad field is
        named as the client named it."""
        try:
            return await self.tm.prepare(gen)
        except FieldError as e:
            message = str(e.renamed(_openai_field(e.field, req)))
            for ours in ("max_new_tokens", "min_new_tokens", "sampling_seed"):  # also when named in passing
                message = message.replace(ours, _openai_field(ours, req))
            raise FieldError(_openai_field(e.field, req), message) from None

    # ---- completions ----
    def completion_input(self, req: CompletionRequest) -> GenerateReqInput:
        adapter = self.check_model(req.model)
        req.log_unknown_fields()
        prompt = req.prompt
        texts = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str))
        want_logprobs = req.logprobs is not None
        return GenerateReqInput(
            prompt=prompt if texts else None,
            input_ids=None if texts else prompt,
            sampling_params=req.sampling_params(req.max_tokens),
            rid=req.rid,
            return_logprob=want_logprobs,
            top_logprobs_num=req.logprobs or 0,
            logprob_start_len=0 if (want_logprobs and req.echo) else -1,
            return_text_in_logprobs=True,
            stream=req.stream,
            routed_dp_rank=req.requested_dp_rank,
            lora_path=adapter,
            **req.bootstrap_fields(),
        )

    def _prompt_texts(self, gen: GenerateReqInput) -> List[str]:
        if gen.prompt is not None:
            return [gen.prompt] if isinstance(gen.prompt, str) else list(gen.prompt)
        ids = gen.input_ids if isinstance(gen.input_ids[0], list) else [gen.input_ids]
        return [self.tm.tokenizer.decode(x) for x in ids]

    async def completions(self, req: CompletionRequest, prepared: PreparedGenerate) -> Dict[str, Any]:
        gen = prepared.obj
        results = [r async for r in self.tm.generate_request(gen, prepared)]
        prompts = self._prompt_texts(gen)
        choices = []
        for i, r in enumerate(results):
            text = (prompts[i // req.n] if req.echo else "") + r["text"]
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason(r["meta_info"])}
            if req.logprobs is not None:
                choice["logprobs"] = completion_logprobs(r["meta_info"], req.echo)
            choices.append(choice)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model, "choices": choices,
                "usage": usage(results, req.n, req.return_cached_tokens_details)}

    async def completions_stream(self, req: CompletionRequest, prepared: PreparedGenerate) -> AsyncIterator[str]:
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        sent: Dict[int, int] = {}
        finals: Dict[int, Dict[str, Any]] = {}
        gen = prepared.obj
        prompts = self._prompt_texts(gen) if req.echo else []
        async for chunk in self.tm.generate_request(gen, prepared):
            index = chunk.get("index", 0)
            prefix = prompts[index // req.n] if req.echo and index not in sent else ""
            delta = chunk["text"][sent.get(index, 0):]
            sent[index] = len(chunk["text"])
            reason = finish_reason(chunk["meta_info"])
            if reason is not None:
                finals[index] = chunk
            if delta or prefix or reason:
                yield sse({"id": cid, "object": "text_completion", "created": created, "model": self.model,
                           "choices": [{"index": index, "text": prefix + delta, "logprobs": None,
                                        "finish_reason": reason}]})
        if req.stream_options and req.stream_options.include_usage:
            ordered = [finals[i] for i in sorted(finals)]
            yield sse({"id": cid, "object": "text_completion", "created": created, "model": self.model,
                       "choices": [], "usage": usage(ordered, req.n, req.return_cached_tokens_details)})
        yield "data: [DONE]\n\n"

    # ---- chat ----
    async def chat_input(self, req: ChatCompletionRequest) -> ChatPlan:
        """Check the request, render its messages and tokenize them (in the
        tokenizer threads: templates and tokenizers are CPU work)."""
        adapter = self.check_model(req.model)
        req.log_unknown_fields()
        if not req.messages:
            raise FieldError("messages", "'messages' must not be empty")
        top = req.top_logprobs or 0
        if top and not req.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs: true")
        args = self.tm.server_args
        tools = plan_tools(req, args.tool_call_parser)
        fields = image_fields(req.messages)
        processor = self.tm.image_processor
        images = take_images(req.messages, processor.placeholder if processor is not None else None)
        prompt, ids = await self.tm.run_in_tokenizer(self._render_and_encode, req, tools)
        opened = think_opened(prompt)
        gen = GenerateReqInput(
            input_ids=ids, sampling_params=self._chat_sampling_params(req, tools, len(ids), opened), rid=req.rid,
            return_logprob=req.logprobs, top_logprobs_num=top, return_text_in_logprobs=True,
            stream=req.stream, routed_dp_rank=req.requested_dp_rank, lora_path=adapter,
            image_data=images or None, **req.bootstrap_fields(),
        )
        parsing = OutputParsing(
            tool_parser=tools.parser if tools.parses_calls else None,
            reasoning_parser=args.reasoning_parser if req.separate_reasoning else None,
            think_opened=opened,
        )
        plan = ChatPlan(gen, parsing)
        try:
            plan.prepared = await self.prepare(req, gen)
        except FieldError as e:
            raise renamed_image_error(e, fields) from None
        return plan

    def _render_and_encode(self, req: ChatCompletionRequest, tools: ToolPlan) -> tuple:
        prompt = self.template.render(req.messages, tool_dicts(tools.offered), tools.parser,
                                      req.chat_template_kwargs)
        return prompt, self.tm.tokenizer.encode(prompt, add_special_tokens=False)

    def _chat_sampling_params(self, req: ChatCompletionRequest, tools: ToolPlan, prompt_len: int,
                              opened: bool) -> Dict[str, Any]:
        """The request's sampling params, plus the grammar of a forced tool call."""
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = max(self.tm.context_len - prompt_len, 1)
        params = req.sampling_params(max_tokens)
        any_whitespace = not self.tm.server_args.constrained_json_disable_any_whitespace
        forced = forced_call_ebnf(tools, any_whitespace=any_whitespace, reasoning_first=opened)
        if forced is not None:
            params["ebnf"] = forced
        return params

    async def chat(self, req: ChatCompletionRequest, plan: ChatPlan) -> Dict[str, Any]:
        results = [r async for r in self.tm.generate_request(plan.gen, plan.prepared)]
        choices = []
        for i, r in enumerate(results):
            reply = parse_reply(r["text"], plan.parsing)
            reason = choice_finish_reason(finish_reason(r["meta_info"]), bool(reply.tool_calls))
            choice = {"index": i, "message": reply_message(reply, plan.parsing),
                      "logprobs": None, "finish_reason": reason}
            if req.logprobs:
                choice["logprobs"] = {"content": chat_logprobs(r["meta_info"])}
            choices.append(choice)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model, "choices": choices,
                "usage": usage(results, req.n, req.return_cached_tokens_details)}

    async def chat_stream(self, req: ChatCompletionRequest, plan: ChatPlan) -> AsyncIterator[str]:
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model}
        sent: Dict[int, int] = {}
        finals: Dict[int, Dict[str, Any]] = {}
        parsers = [ChoiceStream(plan.parsing) for _ in range(req.n)]
        stream = self.tm.generate_request(plan.gen, plan.prepared)
        first = await stream.__anext__()  # a rejected request fails here, before any event
        for i in range(req.n):  # the first delta of every choice carries the role
            yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        async for chunk in prepend(first, stream):
            index = chunk.get("index", 0)
            delta = chunk["text"][sent.get(index, 0):]
            sent[index] = len(chunk["text"])
            reason = finish_reason(chunk["meta_info"])
            parser = parsers[index]
            deltas = parser.feed(delta) if delta else []
            if reason is not None:
                deltas += parser.finish()
            for d in deltas:
                yield sse({**head, "choices": [{"index": index, "delta": d, "logprobs": None,
                                                "finish_reason": None}]})
            if reason is not None:
                finals[index] = chunk
                yield sse({**head, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                                "finish_reason": choice_finish_reason(reason, parser.has_calls)}]})
        if req.stream_options and req.stream_options.include_usage:
            ordered = [finals[i] for i in sorted(finals)]
            yield sse({**head, "choices": [], "usage": usage(ordered, req.n, req.return_cached_tokens_details)})
        yield "data: [DONE]\n\n"


def _openai_field(name: str, req: CommonRequest) -> str:
    """The request field a GenerateReqInput / SamplingParams field came from."""
    chat = isinstance(req, ChatCompletionRequest)
    if name in ("prompt", "input_ids"):
        return "messages" if chat else "prompt"
    if name == "top_logprobs_num":
        return "top_logprobs" if chat else "logprobs"
    if name == "max_new_tokens":
        return "max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens"
    if name == "json_schema" and req.response_format is not None:
        return "response_format"
    if name == "ebnf" and chat and req.tool_choice is not None and req.ebnf is None:
        return "tool_choice"
    return _OPENAI_NAMES.get(name, name)


def completion_logprobs(meta: Dict[str, Any], echo: bool) -> Dict[str, Any]:
    entries = list(meta.get("output_token_logprobs", []))
    tops = list(meta.get("output_top_logprobs", []))
    if echo:
        entries = list(meta.get("input_token_logprobs", [])) + entries
        tops = list(meta.get("input_top_logprobs", []) or [None] * len(meta.get("input_token_logprobs", []))) + tops
    tokens = [text for _, _, text in entries]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t or "")
    return {
        "tokens": tokens,
        "token_logprobs": [lp for lp, _, _ in entries],
        "top_logprobs": [None if top is None else {text: lp for lp, _, text in top} for top in tops] or None,
        "text_offset": offsets,
    }


def chat_logprobs(meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    tops = meta.get("output_top_logprobs") or [[] for _ in meta.get("output_token_logprobs", [])]
    content = []
    for (lp, _, text), top in zip(meta.get("output_token_logprobs", []), tops):
        content.append({
            "token": text, "logprob": lp, "bytes": list(text.encode()),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for v, _, t in top],
        })
    return content


async def prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """An already-fetched first item, then the rest of the stream."""
    yield first
    async for item in rest:
        yield item
