"""Turning generated text into OpenAI chat messages and stream deltas:
reasoning split off first (`--reasoning-parser`), then tool calls parsed from
what remains (`--tool-call-parser`). Pure functions of the text, so that the
assembly is tested without an engine."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from radixserve.parsers.reasoning import ReasoningParser, ReasoningStream, get_reasoning_parser
from radixserve.parsers.tool_call import StreamEvent, ToolCall, ToolCallParser, ToolCallStream, get_tool_parser


@dataclass(frozen=True)
class OutputParsing:
    """How one request's replies are split; the same for all its choices."""

    tool_parser: Optional[str] = None  # parse calls in this format; None: tools were not offered
    reasoning_parser: Optional[str] = None  # None: no split (no parser, or separate_reasoning false)
    think_opened: bool = False  # the prompt ends inside an open think block

    def reasoning(self) -> Optional[ReasoningParser]:
        if self.reasoning_parser is None:
            return None
        # An opened block means everything up to </think> is reasoning. Otherwise
        # qwen3 takes reasoning only from a reply that opens it itself, while
        # deepseek-r1 keeps its own default (its models may omit the opening tag).
        opened = True if self.think_opened else (None if self.reasoning_parser == "deepseek-r1" else False)
        return get_reasoning_parser(self.reasoning_parser, think_opened=opened)

    def tools(self) -> Optional[ToolCallParser]:
        return None if self.tool_parser is None else get_tool_parser(self.tool_parser)


@dataclass
class ChatReply:
    content: Optional[str]  # None when the reply was only calls (or only reasoning)
    reasoning_content: Optional[str] = None
    tool_calls: list[ToolCall] = field(default_factory=list)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_reply(text: str, parsing: OutputParsing) -> ChatReply:
    """The whole reply split into reasoning, content and calls."""
    reasoning_parser, tool_parser = parsing.reasoning(), parsing.tools()
    reasoning = None
    if reasoning_parser is not None:
        reasoning, text = reasoning_parser.parse(text)
        reasoning = reasoning or None
    if tool_parser is None:
        # Without tool parsing the text stays as it is ("" stays "").
        return ChatReply(content=text if reasoning is None or text else None, reasoning_content=reasoning)
    parsed = tool_parser.parse(text)
    content = (parsed.content or None) if (parsed.tool_calls or reasoning is not None) else parsed.content
    return ChatReply(content=content, reasoning_content=reasoning, tool_calls=parsed.tool_calls)


def reply_message(reply: ChatReply, parsing: OutputParsing) -> dict[str, Any]:
    """The OpenAI `message` of one choice. `reasoning_content` is present (maybe
    null) whenever a reasoning parser runs; `tool_calls` only when there are calls."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if parsing.reasoning_parser is not None:
        message["reasoning_content"] = reply.reasoning_content
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": new_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for c in reply.tool_calls
        ]
    return message


def choice_finish_reason(reason: Optional[str], has_calls: bool) -> Optional[str]:
    """OpenAI's "tool_calls" replaces "stop" when the reply called tools; a
    reply cut by max_tokens stays "length", so the client knows it is incomplete."""
    return "tool_calls" if has_calls and reason == "stop" else reason


class ChoiceStream:
    """The delta dicts of one streamed choice: feed text deltas, then finish."""

    def __init__(self, parsing: OutputParsing) -> None:
        reasoning, tools = parsing.reasoning(), parsing.tools()
        self._reasoning: Optional[ReasoningStream] = reasoning.new_stream() if reasoning else None
        self._tools: Optional[ToolCallStream] = tools.new_stream() if tools else None
        self.has_calls = False

    def feed(self, delta: str) -> list[dict[str, Any]]:
        if self._reasoning is None:
            return self._content(delta, final=False)
        return self._split(self._reasoning.feed(delta), final=False)

    def finish(self) -> list[dict[str, Any]]:
        if self._reasoning is None:
            return self._content("", final=True)
        return self._split(self._reasoning.finish(), final=True)

    def _split(self, pieces: list, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for reasoning, content in pieces:
            if reasoning:
                deltas.append({"reasoning_content": reasoning})
            if content:
                deltas.extend(self._content(content, final=False))
        if final:
            deltas.extend(self._content("", final=True))
        return _merge_text(deltas)

    def _content(self, text: str, final: bool) -> list[dict[str, Any]]:
        """Content through the tool-call parser, if one runs."""
        if self._tools is None:
            return [{"content": text}] if text else []
        events = self._tools.feed(text) if text else []
        if final:
            events += self._tools.finish()
        return _merge_text([self._event_delta(e) for e in events])

    def _event_delta(self, event: StreamEvent) -> dict[str, Any]:
        if not event.is_tool_call:
            return {"content": event.content}
        self.has_calls = True
        if event.name is not None:  # a call's first delta: its id, type and name
            return {"tool_calls": [{"index": event.index, "id": new_call_id(), "type": "function",
                                    "function": {"name": event.name, "arguments": ""}}]}
        return {"tool_calls": [{"index": event.index, "function": {"arguments": event.arguments_delta}}]}


def _merge_text(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent deltas of the same text field in one, so a feed sends few chunks."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        prev = out[-1] if out else None
        key = next(iter(d))
        if prev is not None and key in ("content", "reasoning_content") and list(prev) == [key]:
            prev[key] += d[key]
        else:
            out.append(dict(d))
    return out
