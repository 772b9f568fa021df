"""Output parsers for the chat endpoint: tool calls and reasoning content."""

from radixserve.parsers.reasoning import (
    SUPPORTED_REASONING_PARSERS,
    ReasoningDelta,
    ReasoningParser,
    ReasoningStream,
    StartMode,
    get_reasoning_parser,
)
from radixserve.parsers.tool_call import (
    SUPPORTED_TOOL_PARSERS,
    CallTag,
    ParsedReply,
    StreamEvent,
    ToolCall,
    ToolCallParser,
    ToolCallStream,
    get_tool_parser,
    render_tools_prompt,
)

__all__ = [
    "SUPPORTED_REASONING_PARSERS",
    "SUPPORTED_TOOL_PARSERS",
    "CallTag",
    "ParsedReply",
    "ReasoningDelta",
    "ReasoningParser",
    "ReasoningStream",
    "StartMode",
    "StreamEvent",
    "ToolCall",
    "ToolCallParser",
    "ToolCallStream",
    "get_reasoning_parser",
    "get_tool_parser",
    "render_tools_prompt",
]
