"""Parser name (`--tool-call-parser`) -> parser: a new format is one module
plus a line here."""

from __future__ import annotations

from typing import Any, Callable

from radixserve.parsers.tool_call.base import ToolCallParser, function_spec
from radixserve.parsers.tool_call.hermes import HermesToolParser
from radixserve.parsers.tool_call.llama3 import Llama3ToolParser

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
    functions = [function_spec(t) for t in tools]
    return get_tool_parser(parser_name).render_tools_prompt(functions)
