"""`hermes`, `qwen25`: each call is a block
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; a reply may
hold several blocks, and text before (or between, after) them.

Whitespace: the whitespace right before a call is dropped ("Let me
check.\\n\\n<tool_call>..." has content "Let me check."), and whitespace after a
call is dropped when only further calls or the end follow it. Text after calls
keeps its leading whitespace, so "A\\n<call>\\nB" gives "A\\nB", not "AB".
"""

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
    held_prefix_len,
)

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"


def _decode_hermes_body(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)  # tolerates the newlines around the object
    except JSON_ERRORS:
        return None
    return call_from_object(obj, ("arguments", "parameters"))


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
            keep = 0 if final else held_prefix_len(self._buf, HERMES_OPEN)
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
            events.extend(call_events(self._calls, call))
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
            + json.dumps({"name": c.name, "arguments": arguments_value(c.arguments)}, ensure_ascii=False)
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
