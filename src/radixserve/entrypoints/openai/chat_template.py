"""Rendering chat messages, tools and tool-call history through the model's
chat template (or `--chat-template`'s).

Templates written for tool use (Qwen 2.5, Hermes, Llama 3.1, ...) render the
`tools` list and earlier `tool_calls` / `role: "tool"` messages themselves.
Templates that ignore tools (the embedded SmolLM2's) would silently drop them,
so for those the built-in tool prompt of the tool-call parser goes into the
system message, earlier calls are written out as the model would write them
(`format_calls`), and tool results become user turns in
`<tool_response>` tags, as Qwen's template does.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import jinja2

from radixserve.entrypoints.openai.protocol import ChatMessage, ToolCallIn
from radixserve.parsers.tool_call import ToolCall, get_tool_parser, render_tools_prompt

ROLES = ("system", "user", "assistant", "tool")
_PROBE_MESSAGES = [{"role": "user", "content": "hi"}]
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "radixserve_probe_tool", "description": "probe", "parameters": {"type": "object", "properties": {}}}}]


class ChatTemplate:
    """The tokenizer's chat template, with tool support detected once."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._renders_tools: Optional[bool] = None

    @property
    def renders_tools(self) -> bool:
        """Whether the template shows `tools` to the model: a probe rendered with
        and without one tool must differ."""
        if self._renders_tools is None:
            try:
                plain = self._apply(_PROBE_MESSAGES, None, {})
                with_tools = self._apply(_PROBE_MESSAGES, _PROBE_TOOLS, {})
                self._renders_tools = plain != with_tools
            except (jinja2.TemplateError, ValueError, TypeError, KeyError):
                self._renders_tools = False
        return self._renders_tools

    def render(self, messages: Sequence[ChatMessage], tools: list[dict[str, Any]], parser: str,
               template_kwargs: Optional[dict[str, Any]] = None) -> str:
        """The prompt text, ending with the assistant's turn opened. `tools`
        (OpenAI dicts, may be empty) are the ones offered; `parser` names the
        call format for templates that ignore tools."""
        check_roles(messages)
        if self.renders_tools:
            plain = [_native_message(m) for m in messages]
            return self._apply(plain, tools or None, template_kwargs or {})
        plain = _fallback_messages(messages, parser)
        if tools:
            plain = _with_system_text(plain, render_tools_prompt(tools, parser))
        return self._apply(plain, None, template_kwargs or {})

    def _apply(self, messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]],
               template_kwargs: dict[str, Any]) -> str:
        kwargs = {"add_generation_prompt": True, **template_kwargs, "tokenize": False}
        if tools:
            kwargs["tools"] = tools
        else:
            kwargs.pop("tools", None)
        try:
            return self.tokenizer.apply_chat_template(messages, **kwargs)
        except jinja2.TemplateError as e:
            raise ValueError(f"'messages': the chat template cannot render them: {e}") from None
        except TypeError as e:  # a template's runtime type error, or a clashing keyword
            raise ValueError(f"the chat template failed on 'messages' / 'chat_template_kwargs': {e}") from None


def check_roles(messages: Sequence[ChatMessage]) -> None:
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ValueError(f"messages: unsupported role {m.role!r} in 'messages[{i}].role'; "
                             f"supported: {', '.join(ROLES)}")
        if m.tool_calls and m.role != "assistant":
            raise ValueError(f"'messages[{i}].tool_calls' is only allowed on assistant messages")


def think_opened(prompt: str) -> bool:
    """The template opened a think block for the reply (Qwen3 thinking, DeepSeek-R1),
    so the model's first tokens are already reasoning."""
    return prompt.rstrip().endswith("<think>")


def _arguments_object(arguments: Any) -> Any:
    """Templates expect arguments as an object (HF convention); text that is
    not JSON is passed on as it is."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _native_message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.function.name, "arguments": _arguments_object(c.function.arguments)}}
            for c in m.tool_calls
        ]
    if m.role == "tool":
        if m.tool_call_id is not None:
            out["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            out["name"] = m.name
    return out


def _call_text(calls: list[ToolCallIn], parser: str) -> str:
    parsed = []
    for c in calls:
        args = c.function.arguments
        parsed.append(ToolCall(c.function.name, args if isinstance(args, str) else json.dumps(args)))
    return get_tool_parser(parser).format_calls(parsed)


def _fallback_messages(messages: Sequence[ChatMessage], parser: str) -> list[dict[str, Any]]:
    """Messages for a template without tool support: calls written out in the
    parser's format, consecutive tool results merged into one user turn."""
    out: list[dict[str, Any]] = []
    for m in messages:
        text = m.text()
        if m.role == "tool":
            block = f"<tool_response>\n{text}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        if m.tool_calls:
            calls = _call_text(m.tool_calls, parser)
            text = f"{text}\n{calls}" if text else calls
        out.append({"role": m.role, "content": text})
    return [{k: v for k, v in m.items() if k != "_tool_results"} for m in out]


def _with_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`text` appended to the system message, or as a new one at the start."""
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{text}" if first["content"] else text
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
