"""Reasoning parsers: split `<think>...</think>` off a reply (`--reasoning-parser`).

`parse(text)` gives `(reasoning_content, content)`; "" means none (the endpoint
sends null). The reasoning is stripped of surrounding whitespace and the content
after `</think>` of its leading whitespace, since models put newlines there.

Where the reasoning starts depends on the chat template:
- the model writes `<think>` itself: the reply starts with it (after whitespace);
- the template already put `<think>` at the end of the prompt: only `</think>`
  is generated, and everything before it is reasoning.

So each parser has a start mode:
- OPENED: the reply starts inside the reasoning (deepseek-r1: no `</think>` yet
  means it is still thinking, all reasoning).
- AUTO (qwen3's default): reasoning if the reply starts with `<think>` or if a
  `</think>` appears; no tag at all means all content. Streamed, a reply that
  does not start with `<think>` is held back until `</think>` or the end,
  because until then it could be either.
- CLOSED: reasoning only if the reply starts with `<think>`; otherwise all
  content, streamed at once.

The endpoint knows the prompt, so for qwen3 it should pass
`think_opened=prompt.rstrip().endswith("<think>")` (OPENED or CLOSED) and avoid
AUTO's hold-back.

Streamed (`new_stream()`), `feed(delta)` / `finish()` return `ReasoningDelta`s
whose concatenations equal `parse(text)`; partial tags are held back.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class StartMode(Enum):
    OPENED = "opened"
    AUTO = "auto"
    CLOSED = "closed"


class ReasoningDelta(NamedTuple):
    reasoning: str | None
    content: str | None


def _held_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_reasoning(text: str, mode: StartMode) -> tuple[str, str]:
    """The non-streamed split; the reference the stream must reproduce."""
    stripped = text.lstrip()
    opened = stripped.startswith(THINK_OPEN)
    if not opened and mode is StartMode.CLOSED:
        return "", text
    body = stripped[len(THINK_OPEN) :] if opened else text
    end = body.find(THINK_CLOSE)
    if end >= 0:
        return body[:end].strip(), body[end + len(THINK_CLOSE) :].lstrip()
    if opened or mode is StartMode.OPENED:
        return body.strip(), ""  # thinking was cut off (or is still going)
    return "", text


class _State(Enum):
    START = "start"  # before the first non-whitespace: is it <think>?
    REASONING = "reasoning"  # inside the reasoning, looking for </think>
    UNDECIDED = "undecided"  # AUTO without <think>: a later </think> makes it reasoning
    CONTENT = "content"  # everything left is content


class ReasoningStream:
    """Incremental split of one reply; feed deltas in order, then finish once."""

    def __init__(self, mode: StartMode) -> None:
        self._mode = mode
        self._state = _State.START
        self._buf = ""  # received, not yet emitted
        self._searched = 0  # UNDECIDED: _buf[:_searched] holds no complete close tag
        self._reasoning_started = False  # leading whitespace of the reasoning is dropped
        self._pending_ws = ""  # trailing whitespace of the reasoning: dropped at its end
        self._strip_content = False  # right after </think>: drop the content's leading whitespace

    def feed(self, delta: str) -> list[ReasoningDelta]:
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> list[ReasoningDelta]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[ReasoningDelta]:
        out: list[ReasoningDelta] = []
        steps = {
            _State.START: self._step_start,
            _State.REASONING: self._step_reasoning,
            _State.UNDECIDED: self._step_undecided,
            _State.CONTENT: self._step_content,
        }
        while steps[self._state](final, out):
            pass
        return out

    def _step_start(self, final: bool, out: list[ReasoningDelta]) -> bool:
        stripped = self._buf.lstrip()
        if stripped.startswith(THINK_OPEN):
            self._buf = stripped[len(THINK_OPEN) :]
            self._state = _State.REASONING
            return True
        if THINK_OPEN.startswith(stripped) and not final:
            return False  # only whitespace or part of <think> so far
        self._state = {
            StartMode.OPENED: _State.REASONING,
            StartMode.AUTO: _State.UNDECIDED,
            StartMode.CLOSED: _State.CONTENT,
        }[self._mode]
        return True

    def _step_reasoning(self, final: bool, out: list[ReasoningDelta]) -> bool:
        end = self._buf.find(THINK_CLOSE)
        if end >= 0:
            self._close_reasoning(end, out)
            return True
        keep = 0 if final else _held_prefix_len(self._buf, THINK_CLOSE)
        cut = len(self._buf) - keep
        self._reason(self._buf[:cut], out)
        self._buf = self._buf[cut:]
        return False

    def _step_undecided(self, final: bool, out: list[ReasoningDelta]) -> bool:
        # Resume the search where a close tag could still begin.
        end = self._buf.find(THINK_CLOSE, max(0, self._searched - len(THINK_CLOSE) + 1))
        if end >= 0:
            self._close_reasoning(end, out)
            return True
        self._searched = len(self._buf)
        if final:  # no tag at all: the reply is content as written
            self._state = _State.CONTENT
            return True
        return False

    def _step_content(self, final: bool, out: list[ReasoningDelta]) -> bool:
        text, self._buf = self._buf, ""
        if self._strip_content:
            text = text.lstrip()
            self._strip_content = not text
        if text:
            out.append(ReasoningDelta(None, text))
        return False

    def _close_reasoning(self, end: int, out: list[ReasoningDelta]) -> None:
        self._reason(self._buf[:end], out)
        self._pending_ws = ""  # the reasoning is stripped at its end
        self._buf = self._buf[end + len(THINK_CLOSE) :]
        self._state, self._strip_content = _State.CONTENT, True

    def _reason(self, text: str, out: list[ReasoningDelta]) -> None:
        """Emit reasoning, dropping leading whitespace and holding trailing whitespace."""
        if not self._reasoning_started:
            text = text.lstrip()
            self._reasoning_started = bool(text)
        body = text.rstrip()
        if body:
            out.append(ReasoningDelta(self._pending_ws + body, None))
            self._pending_ws = ""
        self._pending_ws += text[len(body) :]


class ReasoningParser:
    def __init__(self, name: str, mode: StartMode) -> None:
        self.name = name
        self.mode = mode

    def parse(self, text: str) -> tuple[str, str]:
        """(reasoning_content, content) of a whole reply."""
        return split_reasoning(text, self.mode)

    def new_stream(self) -> ReasoningStream:
        return ReasoningStream(self.mode)


_DEFAULT_MODES: dict[str, StartMode] = {
    "qwen3": StartMode.AUTO,
    "deepseek-r1": StartMode.OPENED,
}
SUPPORTED_REASONING_PARSERS: tuple[str, ...] = tuple(sorted(_DEFAULT_MODES))


def get_reasoning_parser(name: str, *, think_opened: bool | None = None) -> ReasoningParser:
    """`think_opened`: whether the prompt already ends with `<think>` (True:
    OPENED, False: CLOSED); None keeps the parser's default mode."""
    mode = _DEFAULT_MODES.get(name)
    if mode is None:
        raise ValueError(
            f"unknown reasoning parser {name!r}; supported: {', '.join(SUPPORTED_REASONING_PARSERS)}"
        )
    if think_opened is not None:
        mode = StartMode.OPENED if think_opened else StartMode.CLOSED
    return ReasoningParser(name, mode)
