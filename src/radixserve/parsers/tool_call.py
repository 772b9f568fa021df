"""Tool-call parsers: split a model's reply into content and OpenAI tool calls.

Formats (`--tool-call-parser`):
- `hermes`, `qwen25`: each call is a block
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; a reply may
  hold several blocks, and text before (or between, after) them.
- `llama3`: the reply *is* the call(s): JSON objects `{"name": ..., "parameters":
  {...}}`, optionally after `<|python_tag|>`, several separated by `;`. A reply
  that does not start that way is plain content.

Both come in two forms that always agree: `parse(text)` on a whole reply, and
`new_stream()` whose `feed(delta)` / `finish()` return `StreamEvent`s. The
concatenated streamed content equals `parse(text).content`, and each call's
concatenated argument deltas equal its `arguments`. A call is emitted only once
it is known to be valid (on its closing tag, or at the end), so nothing streamed
is ever taken back; text that may still turn into a tag is held until it cannot.

Malformed calls never raise: their text stays in the content, tags included, so
the client sees what the model wrote.

Whitespace (hermes): the whitespace right before a call is dropped ("Let me
check.\\n\\n<tool_call>..." has content "Let me check."), and whitespace after a
call is dropped when only further calls or the end follow it. Text after calls
keeps its leading whitespace, so "A\\n<call>\\nB" gives "A\\nB", not "AB".
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"

_DECODER = json.JSONDecoder()
# Deeply nested input makes the json module raise RecursionError, not ValueError.
_JSON_ERRORS = (ValueError, RecursionError)


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


# ---------------------------------------------------------------- shared helpers


def compact_json(value: Any) -> str:
    # ensure_ascii=False: OpenAI's arguments carry unicode as is, not \u escapes.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _call_from_object(obj: Any, args_keys: tuple[str, ...]) -> ToolCall | None:
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
        except _JSON_ERRORS:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name=name, arguments=compact_json(args))


def _held_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`:
    text that may still become the tag once more arrives."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _skip_ws(text: str, pos: int) -> int:
    """Index of the first non-whitespace at or after `pos` (str.isspace's whitespace,
    the same set str.strip removes)."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _call_events(index: int, call: ToolCall) -> list[StreamEvent]:
    return [
        StreamEvent(index=index, name=call.name),
        StreamEvent(index=index, arguments_delta=call.arguments),
    ]


def _arguments_value(arguments: str) -> Any:
    """Arguments as a JSON value for re-rendering; text that is not JSON (a
    client may send anything in history) is kept as a string."""
    try:
        return json.loads(arguments)
    except _JSON_ERRORS:
        return arguments


def _function_spec(tool: Any) -> dict[str, Any]:
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


# ---------------------------------------------------------------- hermes / qwen25


def _decode_hermes_body(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)  # tolerates the newlines around the object
    except _JSON_ERRORS:
        return None
    return _call_from_object(obj, ("arguments", "parameters"))


def _hermes_pieces(text: str) -> list[str | ToolCall]:
    """Text split into plain segments and blocks; a block is its ToolCall when
    valid, else its raw text. A block left open at the end runs to the end
    (a model may stop right after the JSON)."""
    pieces: list[str | ToolCall] = []
    pos = 0
    while True:
        start = text.find(HERMES_OPEN, pos)
        if start < 0:
            pieces.append(text[pos:])
            return pieces
        pieces.append(text[pos:start])
        body_start = start + len(HERMES_OPEN)
        end = text.find(HERMES_CLOSE, body_start)
        body_end = len(text) if end < 0 else end
        stop = len(text) if end < 0 else end + len(HERMES_CLOSE)
        pieces.append(_decode_hermes_body(text[body_start:body_end]) or text[start:stop])
        if end < 0:
            return pieces
        pos = stop


def _hermes_content(pieces: list[str | ToolCall]) -> str:
    """Join the non-call pieces, applying the module's whitespace rule."""
    out: list[str] = []
    for i, piece in enumerate(pieces):
        if isinstance(piece, ToolCall):
            continue
        nxt = pieces[i + 1] if i + 1 < len(pieces) else None
        after_call = i > 0 and isinstance(pieces[i - 1], ToolCall)
        if isinstance(nxt, ToolCall):
            piece = piece.rstrip()
        elif nxt is None and after_call and not piece.strip():
            piece = ""
        out.append(piece)
    return "".join(out)


class _HermesStream(ToolCallStream):
    def __init__(self) -> None:
        self._buf = ""  # received, not yet classified
        self._in_block = False  # after <tool_call>, waiting for </tool_call>
        self._searched = 0  # in a block: _buf[:_searched] holds no complete close tag
        self._pending_ws = ""  # trailing whitespace of content: dropped if a call follows
        self._after_call = False  # nothing but whitespace since the last call
        self._calls = 0

    def feed(self, delta: str) -> list[StreamEvent]:
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> list[StreamEvent]:
        events = self._drain(final=True)
        # Trailing whitespace survives unless it directly follows a call.
        if self._pending_ws and not self._after_call:
            events.append(StreamEvent(content=self._pending_ws))
        self._pending_ws = ""
        return events

    def _drain(self, final: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        while True:
            step = self._step_block if self._in_block else self._step_text
            if not step(final, events):
                return events

    def _step_text(self, final: bool, events: list[StreamEvent]) -> bool:
        """Emit text up to the next open tag; True when a block was entered."""
        start = self._buf.find(HERMES_OPEN)
        if start < 0:
            keep = 0 if final else _held_prefix_len(self._buf, HERMES_OPEN)
            cut = len(self._buf) - keep
            self._text(self._buf[:cut], events)
            self._buf = self._buf[cut:]
            return False
        self._text(self._buf[:start], events)
        self._buf = self._buf[start + len(HERMES_OPEN) :]
        self._in_block, self._searched = True, 0
        return True

    def _step_block(self, final: bool, events: list[StreamEvent]) -> bool:
        """Close the block when its end tag (or the reply's end) is here; True if closed."""
        # Resume the search where a close tag could still begin.
        end = self._buf.find(HERMES_CLOSE, max(0, self._searched - len(HERMES_CLOSE) + 1))
        if end < 0 and not final:
            self._searched = len(self._buf)
            return False
        if end < 0:
            body, raw, self._buf = self._buf, HERMES_OPEN + self._buf, ""
        else:
            body = self._buf[:end]
            raw = HERMES_OPEN + body + HERMES_CLOSE
            self._buf = self._buf[end + len(HERMES_CLOSE) :]
        self._in_block = False
        call = _decode_hermes_body(body)
        if call is None:
            self._text(raw, events)
        else:
            self._pending_ws, self._after_call = "", True
            events.extend(_call_events(self._calls, call))
            self._calls += 1
        return True

    def _text(self, text: str, events: list[StreamEvent]) -> None:
        """Emit content, holding its trailing whitespace until we know what follows."""
        body = text.rstrip()
        if body:
            events.append(StreamEvent(content=self._pending_ws + body))
            self._pending_ws, self._after_call = "", False
        self._pending_ws += text[len(body) :]


class HermesToolParser(ToolCallParser):
    """`<tool_call>{json}</tool_call>` blocks (Hermes, Qwen 2.5, Qwen 3)."""

    call_separator = "\n"

    def __init__(self, name: str = "hermes") -> None:
        self.name = name

    def parse(self, text: str) -> ParsedReply:
        pieces = _hermes_pieces(text)
        calls = [p for p in pieces if isinstance(p, ToolCall)]
        return ParsedReply(content=_hermes_content(pieces), tool_calls=calls)

    def new_stream(self) -> ToolCallStream:
        return _HermesStream()

    def format_calls(self, calls: list[ToolCall]) -> str:
        return "\n".join(
            f"{HERMES_OPEN}\n"
            + json.dumps({"name": c.name, "arguments": _arguments_value(c.arguments)}, ensure_ascii=False)
            + f"\n{HERMES_CLOSE}"
            for c in calls
        )

    def call_tag(self, name: str) -> CallTag:
        # The same spacing as format_calls, so that forced calls look like replayed ones.
        head = json.dumps(name, ensure_ascii=False)
        return CallTag(f'{HERMES_OPEN}\n{{"name": {head}, "arguments": ', f"}}\n{HERMES_CLOSE}")

    def render_tools_prompt(self, functions: list[dict[str, Any]]) -> str:
        listing = "\n".join(
            json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions
        )
        return (
            "# Tools\n\n"
            "You can call functions to help answer the user. "
            "The available functions are listed inside <tools></tools>, one JSON signature per line:\n"
            f"<tools>\n{listing}\n</tools>\n\n"
            "To call a function, write a JSON object with its name and arguments "
            f"inside {HERMES_OPEN}{HERMES_CLOSE} tags, exactly like this:\n"
            f'{HERMES_OPEN}\n{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}\n'
            f"{HERMES_CLOSE}\n"
            f"To call several functions, write one {HERMES_OPEN} block per call. "
            "If no function is needed, answer the user directly."
        )


# ---------------------------------------------------------------- llama3

_LLAMA3_ARGS = ("parameters", "arguments")


def _llama3_object(text: str, pos: int) -> tuple[Any, int] | None:
    """The JSON object starting at `pos` and the index after it, or None when
    there is none (yet): a JSON object ends at its own closing brace, so one
    decoded from a prefix is the same as from the whole text."""
    if not text.startswith("{", pos):
        return None
    try:
        return _DECODER.raw_decode(text, pos)
    except _JSON_ERRORS:
        return None


def _llama3_lead_end(text: str, pos: int, first: bool) -> int:
    """Index after what may precede a call at `pos`: whitespace and
    `<|python_tag|>` before the first call, whitespace and one `;` between calls."""
    pos = _skip_ws(text, pos)
    mark = PYTHON_TAG if first else ";"
    if text.startswith(mark, pos):
        pos = _skip_ws(text, pos + len(mark))
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
        call = None if decoded is None else _call_from_object(decoded[0], _LLAMA3_ARGS)
        if call is None:
            self._to_content(pos, events)
            return False
        events.extend(_call_events(self._calls, call))
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
            call = None if decoded is None else _call_from_object(decoded[0], _LLAMA3_ARGS)
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
            json.dumps({"name": c.name, "parameters": _arguments_value(c.arguments)}, ensure_ascii=False)
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


# ---------------------------------------------------------------- registry

_PARSERS: dict[str, Callable[[], ToolCallParser]] = {
    "hermes": lambda: HermesToolParser("hermes"),
    "qwen25": lambda: HermesToolParser("qwen25"),
    "llama3": Llama3ToolParser,
}
SUPPORTED_TOOL_PARSERS: tuple[str, ...] = tuple(sorted(_PARSERS))


def get_tool_parser(name: str) -> ToolCallParser:
    factory = _PARSERS.get(name)
    if factory is None:
        raise ValueError(
            f"unknown tool-call parser {name!r}; supported: {', '.join(SUPPORTED_TOOL_PARSERS)}"
        )
    return factory()


def render_tools_prompt(tools: list[dict[str, Any]], parser_name: str) -> str:
    """Built-in system-prompt text for `tools` (OpenAI format) in the call
    format of `parser_name`, for chat templates that ignore tools."""
    functions = [_function_spec(t) for t in tools]
    return get_tool_parser(parser_name).render_tools_prompt(functions)
