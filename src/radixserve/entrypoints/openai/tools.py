"""OpenAI `tools` / `tool_choice` on the chat endpoint: checking them, and the
plan of what the model is shown, how its reply is constrained and parsed.

Without `--tool-call-parser`, the hermes format (`<tool_call>{json}</tool_call>`)
is used: it is what the built-in tool prompt teaches, what Qwen-style templates
use, and what a forced call is written in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from radixserve.constrained.tool_grammar import FunctionSchema, ToolGrammarSpec, tool_call_ebnf
from radixserve.entrypoints.openai.protocol import ChatCompletionRequest, Tool

DEFAULT_TOOL_PARSER = "hermes"
TOOL_CHOICE_MODES = ("auto", "none", "required")
# OpenAI's rule for function names (plus "." and ":", which MCP-style names use);
# it also keeps names safe to embed in the call grammar and the prompt.
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_CONSTRAINT_FIELDS = ("response_format", "json_schema", "regex", "ebnf")


@dataclass(frozen=True)
class ToolPlan:
    offered: tuple[Tool, ...]  # rendered into the prompt; empty for "none" or no tools
    parser: str  # the call format: prompt, forced grammar and reply parsing
    forced: tuple[str, ...]  # the reply must call one of these (required / named); empty: free
    one_call: bool  # forced to exactly one call

    @property
    def parses_calls(self) -> bool:
        """Replies are searched for calls only when tools were offered."""
        return bool(self.offered)


def plan_tools(req: ChatCompletionRequest, configured_parser: Optional[str]) -> ToolPlan:
    """Check `tools` and `tool_choice`; ValueError names the faulty field."""
    tools = tuple(req.tools or ())
    parser = configured_parser or DEFAULT_TOOL_PARSER
    check_tools(tools)
    mode, named = resolve_tool_choice(req.tool_choice, tools)
    if mode == "none" or not tools:
        return ToolPlan(offered=(), parser=parser, forced=(), one_call=False)
    if mode == "auto":
        return ToolPlan(offered=tools, parser=parser, forced=(), one_call=False)
    given = [f for f in _CONSTRAINT_FIELDS if getattr(req, f, None) is not None]
    if given:
        raise ValueError(f"'tool_choice' {_describe(mode, named)} constrains the reply to tool calls; "
                         f"it cannot be combined with '{given[0]}'")
    if named is not None:
        return ToolPlan(offered=tools, parser=parser, forced=(named,), one_call=True)
    names = tuple(t.function.name for t in tools)
    return ToolPlan(offered=tools, parser=parser, forced=names, one_call=not req.parallel_tool_calls)


def check_tools(tools: Sequence[Tool]) -> None:
    """Names are valid and unique; each parameters schema describes an object and compiles."""
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if not _NAME.fullmatch(name):
            raise ValueError(f"'tools[{i}].function.name' must be 1-64 characters of a-z, A-Z, 0-9, "
                             f"'_', '-', '.', ':'; got {name!r}")
        if name in seen:
            raise ValueError(f"'tools[{i}].function.name': duplicate function name {name!r}")
        seen.add(name)
        kind = (tool.function.parameters or {}).get("type", "object")
        if kind != "object":
            raise ValueError(f"'tools[{i}].function.parameters' must be a JSON schema of type 'object', "
                             f"got type {kind!r}")
    if tools:
        # Compiling every schema (cached) makes a bad one a 400 in every mode,
        # not only when a call is forced.
        tool_call_ebnf(ToolGrammarSpec(function_schemas(tools), DEFAULT_TOOL_PARSER, False, True, False))


def resolve_tool_choice(choice: Any, tools: Sequence[Tool]) -> tuple[str, Optional[str]]:
    """(mode, function name) of `tool_choice`; the default is "auto" with tools, "none" without."""
    if choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(choice, str):
        if choice not in TOOL_CHOICE_MODES:
            raise ValueError(f"'tool_choice' must be one of {', '.join(TOOL_CHOICE_MODES)} or "
                             f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}; got {choice!r}")
        if choice == "required" and not tools:
            raise ValueError("'tool_choice' is 'required' but the request has no 'tools'")
        return choice, None
    name = _named_function(choice)
    known = [t.function.name for t in tools]
    if name not in known:
        listed = ", ".join(repr(k) for k in known) or "none"
        raise ValueError(f"'tool_choice.function.name' {name!r} is not one of the request's 'tools' ({listed})")
    return "required", name


def _named_function(choice: dict) -> str:
    fn = choice.get("function")
    if choice.get("type", "function") != "function" or not isinstance(fn, dict):
        raise ValueError("'tool_choice' as an object must be {\"type\": \"function\", "
                         "\"function\": {\"name\": ...}}")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("'tool_choice.function.name' must be a non-empty string")
    return name


def _describe(mode: str, named: Optional[str]) -> str:
    return f"naming function {named!r}" if named else repr(mode)


def function_schemas(tools: Sequence[Tool], names: Sequence[str] = ()) -> tuple[FunctionSchema, ...]:
    """The tools' argument schemas (all, or only `names`), in request order."""
    out = []
    for i, tool in enumerate(tools):
        fn = tool.function
        if not names or fn.name in names:
            params = fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}
            out.append(FunctionSchema(fn.name, params, f"tools[{i}].function.parameters"))
    return tuple(out)


def forced_call_ebnf(plan: ToolPlan, any_whitespace: bool, reasoning_first: bool) -> Optional[str]:
    """The `ebnf` constraint that forces the plan's calls, or None when calls are free."""
    if not plan.forced:
        return None
    spec = ToolGrammarSpec(function_schemas(plan.offered, plan.forced), plan.parser, plan.one_call,
                           any_whitespace, reasoning_first)
    return tool_call_ebnf(spec)


def tool_dicts(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """Tools as plain OpenAI dicts, for chat templates and the built-in prompt."""
    return [t.model_dump(exclude_none=True) for t in tools]
