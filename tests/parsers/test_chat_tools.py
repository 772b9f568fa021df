"""Tools on the chat endpoint without an engine: checking tools / tool_choice,
the forced-call grammar (on the embedded tokenizer's vocabulary), and rendering
tools and tool-call history through chat templates."""

from __future__ import annotations

import re

import pytest
import xgrammar as xgr

from radixserve.constrained.tool_grammar import FunctionSchema, ToolGrammarSpec, tool_call_ebnf
from radixserve.entrypoints.openai.chat_template import ChatTemplate, think_opened
from radixserve.entrypoints.openai.protocol import ChatCompletionRequest
from radixserve.entrypoints.openai.tools import forced_call_ebnf, plan_tools, tool_dicts
from radixserve.parsers.tool_call import ToolCall, get_tool_parser
from tests.parsers.templates import QWEN_STYLE_TEMPLATE

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]


def request(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **body})


@pytest.fixture(scope="module")
def tokenizer(embedded_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_tokenizer_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    return xgr.GrammarCompiler(info, max_threads=1)


def accepts(compiler, tokenizer, ebnf: str, text: str) -> bool:
    """The grammar takes the whole text and may then end."""
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(ebnf))
    return matcher.accept_string(text) and matcher.accept_token(tokenizer.eos_token_id) and matcher.is_terminated()


# ---------------------------------------------------------------- tools and tool_choice


def test_plan_modes():
    auto = plan_tools(request(tools=TOOLS), None)
    assert auto.parser == "hermes" and len(auto.offered) == 2 and auto.forced == ()
    none = plan_tools(request(tools=TOOLS, tool_choice="none"), "llama3")
    assert none.offered == () and none.parser == "llama3" and not none.parses_calls
    required = plan_tools(request(tools=TOOLS, tool_choice="required"), "qwen25")
    assert required.forced == ("get_weather", "add") and not required.one_call
    single = plan_tools(request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False), None)
    assert single.one_call
    named = plan_tools(request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}), None)
    assert named.forced == ("add",) and named.one_call
    assert plan_tools(request(), None).offered == ()


@pytest.mark.parametrize("body,field", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS + [TOOLS[1]]}, "tools[2].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "nonsense"}}}}}]}, "tools[1].function.parameters"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": "required", "regex": "a+"}, "regex"),
])
def test_bad_tools_name_the_field(body, field):
    with pytest.raises(ValueError, match=re.escape(f"'{field}'")):
        plan_tools(request(**body), None)


# ---------------------------------------------------------------- the forced-call grammar


@pytest.mark.parametrize("parser", ["hermes", "qwen25", "llama3"])
def test_grammar_accepts_what_the_parser_reads(compiler, tokenizer, parser):
    fmt = get_tool_parser(parser)
    plan = plan_tools(request(tools=TOOLS, tool_choice="required"), parser)
    ebnf = forced_call_ebnf(plan, any_whitespace=True, reasoning_first=False)
    calls = [ToolCall("get_weather", '{"city": "Paris", "unit": "celsius"}'), ToolCall("add", '{"a": 2, "b": 40}')]
    for chosen in ([calls[0]], [calls[1]], calls):
        text = fmt.format_calls(chosen)
        assert accepts(compiler, tokenizer, ebnf, text), text
        parsed = fmt.parse(text)
        assert [c.name for c in parsed.tool_calls] == [c.name for c in chosen] and not parsed.content.strip()
    assert not accepts(compiler, tokenizer, ebnf, "")  # at least one call
    assert not accepts(compiler, tokenizer, ebnf, fmt.format_calls([ToolCall("other", "{}")]))
    assert not accepts(compiler, tokenizer, ebnf, fmt.format_calls([ToolCall("add", '{"a": 100, "b": 1}')]))
    assert not accepts(compiler, tokenizer, ebnf, fmt.format_calls([ToolCall("get_weather", '{"city": "Paris"}')]))
    assert not accepts(compiler, tokenizer, ebnf, "Sure! " + fmt.format_calls(calls[:1]))


def test_grammar_one_call_compact_and_reasoning(compiler, tokenizer):
    one = FunctionSchema("add", ADD, "tools[1].function.parameters")
    compact = tool_call_ebnf(ToolGrammarSpec((one,), "hermes", True, False, False))
    call = '<tool_call>\n{"name": "add", "arguments": {"a":1,"b":2}}\n</tool_call>'
    assert accepts(compiler, tokenizer, compact, call)
    assert not accepts(compiler, tokenizer, compact, call.replace('"b":2', '"b": 2'))  # compact JSON only
    assert not accepts(compiler, tokenizer, compact, call + "\n" + call)  # exactly one call
    thinking = tool_call_ebnf(ToolGrammarSpec((one,), "hermes", True, False, True))
    assert accepts(compiler, tokenizer, thinking, "Adding <b>1</b> and 2.</think>\n\n" + call)
    assert not accepts(compiler, tokenizer, thinking, call)  # the think block must close first


def test_grammar_names_a_bad_schema():
    bad = FunctionSchema("f", {"type": "object", "properties": {"x": {"type": "nonsense"}}},
                         "tools[4].function.parameters")
    with pytest.raises(ValueError, match=r"'tools\[4\].function.parameters' is not a usable JSON schema"):
        tool_call_ebnf(ToolGrammarSpec((bad,), "hermes", False, True, False))


def test_free_choice_has_no_grammar():
    assert forced_call_ebnf(plan_tools(request(tools=TOOLS), None), True, False) is None


# ---------------------------------------------------------------- chat templates

HISTORY = [
    {"role": "user", "content": "Weather in Paris, and 2 + 40?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 40}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "42"},
]


def test_template_without_tool_support_gets_builtin_prompt(tokenizer):
    template = ChatTemplate(tokenizer)
    assert not template.renders_tools  # SmolLM2's template ignores tools
    req = request(messages=[{"role": "system", "content": "Be brief."}, *HISTORY], tools=TOOLS)
    prompt = template.render(req.messages, tool_dicts(req.tools), "hermes")
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and '"name": "get_weather"' in system
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "add"') in prompt
    assert ("<|im_start|>user\n<tool_response>\n18 C\n</tool_response>\n<tool_response>\n42\n</tool_response>"
            "<|im_end|>") in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    llama = template.render(req.messages, tool_dicts(req.tools), "llama3")
    assert '{"name": "add", "parameters": {"a": 2, "b": 40}}' in llama and '"parameters"' in llama.split("<|im_end|>")[0]
    no_tools = template.render(req.messages, [], "hermes")  # tool_choice none: history still shown
    assert "# Tools" not in no_tools and "<tool_response>\n42" in no_tools


def test_template_with_tool_support_renders_natively(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = QWEN_STYLE_TEMPLATE
    template = ChatTemplate(tokenizer)
    assert template.renders_tools
    req = request(messages=HISTORY, tools=TOOLS)
    prompt = template.render(req.messages, tool_dicts(req.tools), "hermes")
    assert "For each function call" in prompt and "You can call functions" not in prompt
    assert '{"name": "add", "arguments": {"a": 2, "b": 40}}' in prompt  # arguments passed as an object
    assert think_opened(prompt)
    closed = template.render(req.messages, [], "hermes", {"enable_thinking": False})
    assert not think_opened(closed) and "<tools>" not in closed


def test_template_errors_are_value_errors(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="roles must alternate"):
        ChatTemplate(tokenizer).render(request().messages, [], "hermes")
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        ChatTemplate(tokenizer).render(request(messages=[{"role": "robot", "content": "x"}]).messages, [], "hermes")


# ---------------------------------------------------------------- the server flags


def test_parser_flags_are_checked(capsys):
    from radixserve.entrypoints.launch_server import parse_args
    from radixserve.server_args import ServerArgs

    args = parse_args(["--tool-call-parser", "llama3", "--reasoning-parser", "deepseek-r1"])
    assert (args.tool_call_parser, args.reasoning_parser) == ("llama3", "deepseek-r1")
    assert ServerArgs().tool_call_parser is None and ServerArgs().reasoning_parser is None
    with pytest.raises(ValueError, match=re.escape("--tool-call-parser must be one of hermes|llama3|qwen25")):
        ServerArgs(tool_call_parser="xml")
    with pytest.raises(ValueError, match="--reasoning-parser"):
        ServerArgs(reasoning_parser="o1")
    with pytest.raises(SystemExit):
        parse_args(["--reasoning-parser", "o1"])
    assert "--reasoning-parser" in capsys.readouterr().err
