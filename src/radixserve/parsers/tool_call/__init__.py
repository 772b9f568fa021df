"""Tool-call parsers: split a model's reply into content and OpenAI tool calls.

One module per format (`--tool-call-parser`), each described there:
hermes.py (`hermes`, `qwen25`), llama3.py (`llama3`); base.py holds the types
and helpers they share, registry.py the names.

Both come in two forms that always agree: `parse(text)` on a whole reply, and
`new_stream()` whose `feed(delta)` / `finish()` return `StreamEvent`s. The
concatenated streamed content equals `parse(text).content`, and each call's
concatenated argument deltas equal its `arguments`. A call is emitted only once
it is known to be valid (on its closing tag, or at the end), so nothing streamed
is ever taken back; text that may still turn into a tag is held until it cannot.

Malformed calls never raise: their text stays in the content, tags included, so
the client sees what the model wrote.
"""

from radixserve.parsers.tool_call.base import (
    CallTag,
    ParsedReply,
    StreamEvent,
    ToolCall,
    ToolCallParser,
    ToolCallStream,
)
from radixserve.parsers.tool_call.registry import SUPPORTED_TOOL_PARSERS, get_tool_parser, render_tools_prompt

__all__ = [
    "SUPPORTED_TOOL_PARSERS",
    "CallTag",
    "ParsedReply",
    "StreamEvent",
    "ToolCall",
    "ToolCallParser",
    "ToolCallStream",
    "get_tool_parser",
    "render_tools_prompt",
]
