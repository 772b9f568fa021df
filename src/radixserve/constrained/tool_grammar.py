"""The grammar that forces a reply to be tool calls (tool_choice "required" or a
named function): each call is written as the tool-call parser reads it, with
arguments that match that function's `parameters` schema.

It is built as an xgrammar structural tag and handed on as EBNF text, so it
travels as an ordinary `ebnf` constraint: the scheduler needs no new kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import xgrammar as xgr

from radixserve.parsers.reasoning import THINK_CLOSE
from radixserve.parsers.tool_call import get_tool_parser


@dataclass(frozen=True)
class FunctionSchema:
    name: str
    parameters: dict[str, Any]
    field: str  # where it came from in the request, for error messages


@dataclass(frozen=True)
class ToolGrammarSpec:
    functions: tuple[FunctionSchema, ...]
    parser: str  # a SUPPORTED_TOOL_PARSERS name: the call format
    one_call: bool  # exactly one call (a named function, parallel_tool_calls false); else one or more
    any_whitespace: bool  # JSON may hold free whitespace (else compact)
    reasoning_first: bool  # the prompt opened a think block: free reasoning, then </think>, then the calls


def tool_call_ebnf(spec: ToolGrammarSpec) -> str:
    """EBNF text for `spec`; ValueError naming the field of a schema that cannot be compiled."""
    # Not sort_keys: the order of properties is the order the model writes them in.
    key = json.dumps(
        [[f.name, f.parameters, f.field] for f in spec.functions]
        + [spec.parser, spec.one_call, spec.any_whitespace, spec.reasoning_first]
    )
    return _cached_ebnf(key)


@lru_cache(maxsize=256)
def _cached_ebnf(key: str) -> str:
    *functions, parser_name, one_call, any_whitespace, reasoning_first = json.loads(key)
    parser = get_tool_parser(parser_name)
    tags = []
    for name, parameters, field in functions:
        tag = parser.call_tag(name)
        tags.append({"type": "tag", "begin": tag.begin, "end": tag.end,
                     "content": {"type": "grammar", "grammar": _arguments_ebnf(parameters, field, any_whitespace)}})
    calls = {"type": "tags_with_separator", "tags": tags, "separator": parser.call_separator,
             "at_least_one": True, "stop_after_first": one_call}
    fmt: dict[str, Any] = calls
    if reasoning_first:
        # Reasoning models think before they act; closing the think block is
        # the only way on to the calls, so the split of the reply stays right.
        fmt = {"type": "sequence", "elements": [
            {"type": "any_text", "excludes": [THINK_CLOSE]},
            {"type": "const_string", "value": THINK_CLOSE + "\n\n"},
            calls,
        ]}
    grammar = xgr.Grammar.from_structural_tag(json.dumps({"type": "structural_tag", "format": fmt}))
    return str(grammar)


def _arguments_ebnf(parameters: dict[str, Any], field: str, any_whitespace: bool) -> str:
    """The arguments object's grammar, compact unless free whitespace is allowed
    (the server's --constrained-json-disable-any-whitespace decides)."""
    try:
        if any_whitespace:
            grammar = xgr.Grammar.from_json_schema(json.dumps(parameters))
        else:
            grammar = xgr.Grammar.from_json_schema(json.dumps(parameters), any_whitespace=False,
                                                   separators=(",", ":"))
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"'{field}' is not a usable JSON schema: {e}") from None
    return str(grammar)

