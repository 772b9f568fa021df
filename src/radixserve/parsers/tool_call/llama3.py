"""`llama3`: the reply *is* the call(s): JSON objects `{"name": ..., "parameters":
{...}}`, optionally after `<|python_tag|>`, several separated by `;`. A reply
that does not start that way is plain content."""

from __future__ import annotations

import json
from typing import Any

from radixserve.parsers.tool_call.base import (
    JSON_ERRORS,
    CallTag,
    ParsedReply,
    StreamEvent,
    ToolCall,
    ToolCallParser,
    ToolCallStream,
    arguments_value,
    call_events,
    call_from_object,
    skip_ws,
)

PYTHON_TAG = "<|python_tag|>"

_DECODER = json.JSONDecoder()
_LLAMA3_ARGS = ("parameters", "arguments")


def _llama3_object(text: str, pos: int) -> tuple[Any, int] | None:
    """The JSON object starting at `pos` and the index after it, or None when
    there is none (yet): a JSON object ends at its own closing brace, so one
    decoded from a prefix is the same as from the whole text."""
    if not text.startswith("{", pos):
        return None
    try:
        return _DECODER.raw_decode(text, pos)
    except JSON_ERRORS:
        return None


def _llama3_lead_end(text: str, pos: int, first: bool) -> int:
    """Index after what may precede a call at `pos`: whitespace and
    `<|python_tag|>` before the first call, whitespace and one `;` between calls."""
    pos = skip_ws(text, pos)
    mark = PYTHON_TAG if first else ";"
    if text.startswith(mark, pos):
        pos = skip_ws(text, pos + len(mark))
    return pos


class _BraceScanner:
    """Finds where a JSON object's braces balance, reading each character once
    across feeds (re-decoding the buffer on every delta would be quadratic)."""

    def __init__(self) -> None:
        self._pos = -1  # next index to read; -1: not started
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def scan(self, text: str, start: int) -> int | None:
        """Index after the '}' that closes the object opening at `start`, or None yet."""
        if self._pos < start:
            self._pos = start
        while self._pos < len(text):
            ch = text[self._pos]
            self._pos += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch == "{":
                self._depth += 1
            elif ch == "}":
                self._depth -= 1
                if self._depth == 0:
                    return self._pos
        return None


class _Llama3Stream(ToolCallStream):
    def __init__(self) -> None:
        self._buf = ""  # not yet emitted: the whole reply until the first call, then what follows the last
        self._calls = 0
        self._passthrough = False  # decided: everything from here on is content
        self._braces = _BraceScanner()

    def feed(self, delta: str) -> list[StreamEvent]:
        if self._passthrough:
            return [StreamEvent(content=delta)] if delta else []
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> list[StreamEvent]:
        if self._passthrough:
            return []
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        while not self._passthrough and self._step(final, events):
            pass
        return events

    def _step(self, final: bool, events: list[StreamEvent]) -> bool:
        """Take one call off the buffer (True), or wait / switch to content (False)."""
        pos = self._object_start()
        if pos is None:  # only whitespace, separators or part of the python tag so far
            if final:
                self._to_content(len(self._buf), events)
            return False
        if self._buf[pos] != "{":
            self._to_content(pos, events)
            return False
        # Decode only once the braces balance: a valid object ends exactly
        # there, so if it does not decode then, no later text can fix it.
        if self._braces.scan(self._buf, pos) is None:
            if final:
                self._to_content(pos, events)
            return False
        decoded = _llama3_object(self._buf, pos)
        call = None if decoded is None else call_from_object(decoded[0], _LLAMA3_ARGS)
        if call is None:
            self._to_content(pos, events)
            return False
        events.extend(call_events(self._calls, call))
        self._calls += 1
        self._buf, self._braces = self._buf[decoded[1] :], _BraceScanner()
        return True

    def _object_start(self) -> int | None:
        """Where the next call's `{` (or the first other text) is; None while
        the lead may still grow into a python tag or separator."""
        first = self._calls == 0
        buf = self._buf
        pos = _llama3_lead_end(buf, 0, first)
        partial_tag = first and len(buf) - pos < len(PYTHON_TAG) and PYTHON_TAG.startswith(buf[pos:])
        return None if pos == len(buf) or partial_tag else pos

    def _to_content(self, pos: int, events: list[StreamEvent]) -> None:
        # Before any call the reply is plain content as written; after calls,
        # content starts at the first thing that is not a call.
        text = self._buf if self._calls == 0 else self._buf[pos:]
        if text:
            events.append(StreamEvent(content=text))
        self._buf, self._passthrough = "", True


class Llama3ToolParser(ToolCallParser):
    """Llama 3.x JSON tool calls: the reply is `{"name", "parameters"}` objects."""

    name = "llama3"
    call_separator = "; "

    def parse(self, text: str) -> ParsedReply:
        calls: list[ToolCall] = []
        pos = _llama3_lead_end(text, 0, first=True)
        while True:
            decoded = _llama3_object(text, pos)
            call = None if decoded is None else call_from_object(decoded[0], _LLAMA3_ARGS)
            if call is None:
                break
            calls.append(call)
            pos = _llama3_lead_end(text, decoded[1], first=False)
        if not calls:
            return ParsedReply(content=text, tool_calls=[])
        return ParsedReply(content=text[pos:], tool_calls=calls)

    def new_stream(self) -> ToolCallStream:
        return _Llama3Stream()

    def format_calls(self, calls: list[ToolCall]) -> str:
        return "; ".join(
            json.dumps({"name": c.name, "parameters": arguments_value(c.arguments)}, ensure_ascii=False)
            for c in calls
        )

    def call_tag(self, name: str) -> CallTag:
        head = json.dumps(name, ensure_ascii=False)
        return CallTag(f'{{"name": {head}, "parameters": ', "}")

    def render_tools_prompt(self, functions: list[dict[str, Any]]) -> str:
        listing = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
        return (
            "You can call functions to help answer the user. "
            "The available functions, one JSON signature per line:\n"
            f"{listing}\n\n"
            "To call a function, reply with only a JSON object of the form "
            '{"name": "<function name>", "parameters": {<arguments as a JSON object>}} '
            "and nothing else. To call several functions, separate the objects with \";\". "
            "If no function is needed, answer the user directly in plain text."
        )
