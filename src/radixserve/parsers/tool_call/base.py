"""What every tool-call format shares: the parsed types, the parser and
stream interfaces, and the JSON helpers the formats build on."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

# Deeply nested input makes the json module raise RecursionError, not ValueError.
JSON_ERRORS = (ValueError, RecursionError)


@dataclass
class ToolCall:
    name: str
    arguments: str  # compact JSON text of an object, as OpenAI's `function.arguments`


@dataclass
class ParsedReply:
    content: str  # "" when the reply was only calls; the endpoint sends null then
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class CallTag:
    """How one call to a known function is written, split around its arguments
    object: `begin + <arguments JSON> + end`. Calls are joined by the parser's
    `call_separator`. Constrained decoding builds its grammar from these."""

    begin: str
    end: str


@dataclass
class StreamEvent:
    """One streamed piece: content text, or a delta of tool call `index`.

    Like OpenAI's `delta.tool_calls[i]`: a call's first event carries its index
    and name (arguments_delta None), later ones carry argument text.
    """

    content: str | None = None
    index: int | None = None
    name: str | None = None
    arguments_delta: str | None = None

    @property
    def is_tool_call(self) -> bool:
        return self.index is not None


class ToolCallStream(ABC):
    """Incremental parser for one reply; feed deltas in order, then finish once."""

    @abstractmethod
    def feed(self, delta: str) -> list[StreamEvent]: ...

    @abstractmethod
    def finish(self) -> list[StreamEvent]: ...


class ToolCallParser(ABC):
    name: str

    @abstractmethod
    def parse(self, text: str) -> ParsedReply: ...

    @abstractmethod
    def new_stream(self) -> ToolCallStream: ...

    @abstractmethod
    def format_calls(self, calls: list[ToolCall]) -> str:
        """The text the model would write for these calls (for replaying an
        assistant message's tool_calls into a prompt)."""

    @abstractmethod
    def render_tools_prompt(self, functions: list[dict[str, Any]]) -> str:
        """Instruction text listing `functions` (validated specs) and the call format."""

    call_separator: str

    @abstractmethod
    def call_tag(self, name: str) -> CallTag:
        """The text around the arguments of a call to `name`, as `parse` reads it."""


def compact_json(value: Any) -> str:
    # ensure_ascii=False: OpenAI's arguments carry unicode as is, not \u escapes.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def call_from_object(obj: Any, args_keys: tuple[str, ...]) -> ToolCall | None:
    """A ToolCall when `obj` is {"name": str, <args key>: object}, else None."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args: Any = {}
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    if args is None:  # a call without arguments, written as null
        args = {}
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args)
        except JSON_ERRORS:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name=name, arguments=compact_json(args))


def held_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`:
    text that may still become the tag once more arrives."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def skip_ws(text: str, pos: int) -> int:
    """Index of the first non-whitespace at or after `pos` (str.isspace's whitespace,
    the same set str.strip removes)."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def call_events(index: int, call: ToolCall) -> list[StreamEvent]:
    return [
        StreamEvent(index=index, name=call.name),
        StreamEvent(index=index, arguments_delta=call.arguments),
    ]


def arguments_value(arguments: str) -> Any:
    """Arguments as a JSON value for re-rendering; text that is not JSON (a
    client may send anything in history) is kept as a string."""
    try:
        return json.loads(arguments)
    except JSON_ERRORS:
        return arguments


def function_spec(tool: Any) -> dict[str, Any]:
    """The function of one OpenAI `tools` entry, checked; ValueError names the fault."""
    if not isinstance(tool, dict):
        raise ValueError(f"each tool must be an object, got {type(tool).__name__}")
    kind = tool.get("type", "function")
    if kind != "function":
        raise ValueError(f"unsupported tool type {kind!r}; only 'function' is supported")
    fn = tool.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError("each tool needs a 'function' object with a non-empty 'name'")
    spec: dict[str, Any] = {"name": fn["name"]}
    if fn.get("description"):
        spec["description"] = fn["description"]
    spec["parameters"] = fn.get("parameters") or {"type": "object", "properties": {}}
    return spec
