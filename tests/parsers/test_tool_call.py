"""Tool-call parsers on realistic replies: whole and streamed at every split
point and random chunkings; streamed results must equal the whole-reply parse."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixserve.parsers.tool_call import (
    SUPPORTED_TOOL_PARSERS,
    ParsedReply,
    StreamEvent,
    ToolCall,
    get_tool_parser,
    render_tools_prompt,
)

HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def call(name: str, args: dict) -> ToolCall:
    return ToolCall(name, json.dumps(args, ensure_ascii=False, separators=(",", ":")))


def hermes_block(obj: dict) -> str:
    return "<tool_call>\n" + json.dumps(obj, ensure_ascii=False) + "\n</tool_call>"


WEATHER = {"city": "Paris", "unit": "celsius"}
TRIP = {
    "traveller": {"name": "Zoë Ångström", "tags": ["vip", "東京"], "age": 41},
    "legs": [{"from": "CDG", "to": "NRT", "seats": 2, "meal": None}, {"from": "NRT", "to": "HND"}],
    "note": 'café ☕ — "quoted", {braces}; <tag> 🚀',
    "budget": 1234.5,
    "flexible": True,
}

# (name, text, expected)
HERMES_FIXTURES: list[tuple[str, str, ParsedReply]] = [
    (
        "text_then_call",
        "Let me check the weather for you.\n\n" + hermes_block({"name": "get_weather", "arguments": WEATHER}),
        ParsedReply("Let me check the weather for you.", [call("get_weather", WEATHER)]),
    ),
    (
        "two_calls",
        hermes_block({"name": "get_weather", "arguments": {"city": "Paris"}})
        + "\n"
        + hermes_block({"name": "get_time", "arguments": {"timezone": "Europe/Paris"}})
        + "\n",
        ParsedReply("", [call("get_weather", {"city": "Paris"}), call("get_time", {"timezone": "Europe/Paris"})]),
    ),
    (
        "nested_unicode",
        "Je réserve ça tout de suite 🙂\n" + hermes_block({"name": "book_trip", "arguments": TRIP}),
        ParsedReply("Je réserve ça tout de suite 🙂", [call("book_trip", TRIP)]),
    ),
    (
        "malformed_json",
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',
        ParsedReply('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>', []),
    ),
    (
        "no_call",
        "The capital of France is Paris. It has about 2.1 million inhabitants.\n",
        ParsedReply("The capital of France is Paris. It has about 2.1 million inhabitants.\n", []),
    ),
    (
        "text_after_call",
        "Sure.\n" + hermes_block({"name": "f", "arguments": {}}) + "\nI called f for you.",
        ParsedReply("Sure.\nI called f for you.", [call("f", {})]),
    ),
    (
        "unterminated_valid_call",  # the model stopped right after the JSON
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n',
        ParsedReply("", [call("get_weather", {"city": "Oslo"})]),
    ),
    (
        "mentions_tag_in_prose",
        "Wrap each call in a <tool_call> tag, as in <tool_call>...</tool_call>.",
        ParsedReply("Wrap each call in a <tool_call> tag, as in <tool_call>...</tool_call>.", []),
    ),
    (
        "valid_then_malformed",
        hermes_block({"name": "a", "arguments": {"x": 1}}) + "\n<tool_call>\n{name: b}\n</tool_call>",
        ParsedReply("\n<tool_call>\n{name: b}\n</tool_call>", [call("a", {"x": 1})]),
    ),
    (
        "double_encoded_arguments",
        '<tool_call>\n{"name": "search", "arguments": "{\\"q\\": \\"naïve bayes\\", \\"k\\": 3}"}\n</tool_call>',
        ParsedReply("", [call("search", {"q": "naïve bayes", "k": 3})]),
    ),
    (
        "missing_name",
        '<tool_call>\n{"arguments": {"x": 1}}\n</tool_call>',
        ParsedReply('<tool_call>\n{"arguments": {"x": 1}}\n</tool_call>', []),
    ),
    (
        "no_arguments_and_compact_tags",
        'Okay <tool_call>{"name": "list_files"}</tool_call>',
        ParsedReply("Okay", [call("list_files", {})]),
    ),
    (
        "angle_brackets_in_text",
        "if a < b and b <tool x> then <tool_cal",
        ParsedReply("if a < b and b <tool x> then <tool_cal", []),
    ),
]

LLAMA3_FIXTURES: list[tuple[str, str, ParsedReply]] = [
    (
        "one_call",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        ParsedReply("", [call("get_weather", WEATHER)]),
    ),
    (
        "python_tag",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        ParsedReply("", [call("get_weather", WEATHER)]),
    ),
    (
        "two_calls",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "search", "parameters": {"q": "a;b}{c", "lang": "ü"}}',
        ParsedReply("", [call("get_weather", {"city": "Paris"}), call("search", {"q": "a;b}{c", "lang": "ü"})]),
    ),
    (
        "nested_unicode_leading_ws",
        "\n\n" + json.dumps({"name": "book_trip", "parameters": TRIP}, ensure_ascii=False) + "\n",
        ParsedReply("", [call("book_trip", TRIP)]),
    ),
    (
        "plain_text",
        "I can't look that up, but Paris is usually mild in May.",
        ParsedReply("I can't look that up, but Paris is usually mild in May.", []),
    ),
    (
        "json_that_is_not_a_call",
        '{"answer": 42, "unit": "m"}',
        ParsedReply('{"answer": 42, "unit": "m"}', []),
    ),
    (
        "malformed",
        '{"name": "get_weather", "parameters": {"city": "Paris"}',
        ParsedReply('{"name": "get_weather", "parameters": {"city": "Paris"}', []),
    ),
    (
        "text_before_json",
        'Here you go: {"name": "get_weather", "parameters": {"city": "Paris"}}',
        ParsedReply('Here you go: {"name": "get_weather", "parameters": {"city": "Paris"}}', []),
    ),
    (
        "call_then_text",
        '{"name": "f", "parameters": {}};\nAnything else?',
        ParsedReply("Anything else?", [call("f", {})]),
    ),
    (
        "arguments_key_and_trailing_separator",
        '<|python_tag|> {"name": "f", "arguments": {"n": [1, 2, {"m": null}]}};  ',
        ParsedReply("", [call("f", {"n": [1, 2, {"m": None}]})]),
    ),
    (
        "python_tag_then_builtin_call",  # Llama's built-in tools are Python, not JSON
        '<|python_tag|>brave_search.call(query="weather Paris")',
        ParsedReply('<|python_tag|>brave_search.call(query="weather Paris")', []),
    ),
]

ALL_FIXTURES = [("hermes", *f) for f in HERMES_FIXTURES] + [("qwen25", *f) for f in HERMES_FIXTURES[:3]] + [
    ("llama3", *f) for f in LLAMA3_FIXTURES
]
FIXTURE_IDS = [f"{p}-{n}" for p, n, _, _ in ALL_FIXTURES]


@dataclass
class Streamed:
    content: str
    calls: list[tuple[str, str]]  # (name, concatenated argument deltas) by index


def run_stream(parser_name: str, chunks: list[str]) -> Streamed:
    stream = get_tool_parser(parser_name).new_stream()
    events: list[StreamEvent] = []
    for chunk in chunks:
        events += stream.feed(chunk)
    events += stream.finish()
    return collect(events)


def collect(events: list[StreamEvent]) -> Streamed:
    content: list[str] = []
    calls: list[list[str]] = []
    for ev in events:
        if not ev.is_tool_call:
            assert ev.content, "content events carry non-empty text"
            assert ev.name is None and ev.arguments_delta is None
            content.append(ev.content)
        elif ev.name is not None:  # a call's first event: the next index, its name
            assert ev.index == len(calls) and ev.content is None and ev.arguments_delta is None
            calls.append([ev.name, ""])
        else:
            assert ev.index == len(calls) - 1 and ev.arguments_delta is not None
            calls[ev.index][1] += ev.arguments_delta
    return Streamed("".join(content), [(n, a) for n, a in calls])


def assert_stream_matches(parser_name: str, text: str, chunks: list[str]) -> None:
    assert "".join(chunks) == text
    expected = get_tool_parser(parser_name).parse(text)
    got = run_stream(parser_name, chunks)
    assert got.content == expected.content, chunks
    assert [n for n, _ in got.calls] == [c.name for c in expected.tool_calls], chunks
    for (_, args), c in zip(got.calls, expected.tool_calls):
        assert json.loads(args) == json.loads(c.arguments), chunks


def splits(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


# ---------------------------------------------------------------- whole replies


@pytest.mark.parametrize("parser_name,name,text,expected", ALL_FIXTURES, ids=FIXTURE_IDS)
def test_fixture_parse(parser_name: str, name: str, text: str, expected: ParsedReply):
    got = get_tool_parser(parser_name).parse(text)
    assert got == expected
    for c in got.tool_calls:
        assert isinstance(json.loads(c.arguments), dict)
        assert c.arguments == json.dumps(json.loads(c.arguments), ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------- streamed


@pytest.mark.parametrize("parser_name,name,text,expected", ALL_FIXTURES, ids=FIXTURE_IDS)
def test_fixture_stream_every_split_point(parser_name: str, name: str, text: str, expected: ParsedReply):
    for cut in range(len(text) + 1):
        assert_stream_matches(parser_name, text, splits(text, [cut]))
    assert_stream_matches(parser_name, text, list(text))  # one character per delta


@HYPO
@given(fixture=st.sampled_from(ALL_FIXTURES), data=st.data())
def test_fixture_stream_random_chunkings(fixture, data):
    parser_name, _, text, _ = fixture
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert_stream_matches(parser_name, text, splits(text, cuts))


# Fragments that provoke the edge cases: tags whole and cut, JSON bits, whitespace.
FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<tool_", "call>", "</tool", "<", ">", "\n", " ", "  \n",
    '{"name": "f", "arguments": {"a": 1}}', '{"name": "g", "parameters": {"s": "x;}"}}',
    '{"x": 1}', "{", "}", '"', ";", "<|python_tag|>", "<|pyth", "hello", "é🙂", "null",
]


@HYPO
@given(parser_name=st.sampled_from(["hermes", "llama3"]), data=st.data())
def test_random_replies_stream_equals_parse(parser_name, data):
    text = "".join(data.draw(st.lists(st.sampled_from(FRAGMENTS), max_size=10)))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    assert_stream_matches(parser_name, text, splits(text, cuts))


def test_partial_tag_is_held_back_then_released():
    stream = get_tool_parser("hermes").new_stream()
    assert collect(stream.feed("Hello <tool_c")).content == "Hello"  # "<tool_c" may be a tag
    events = stream.feed('all>\n{"name": "f", "arguments": {"x": [1]}}\n</tool')
    assert events == []  # inside a call: nothing until it is known to be valid
    events = stream.feed("_call> and <b>")
    got = collect(events)
    assert got.calls == [("f", '{"x":[1]}')]
    assert got.content == " and <b>"  # text after a call keeps its whitespace
    assert collect(stream.finish()).content == ""


def test_plain_text_streams_without_delay():
    stream = get_tool_parser("hermes").new_stream()
    out = "".join(collect(stream.feed(w)).content for w in ["The ", "answer ", "is 4", "2."])
    assert out == "The answer is 42."  # only trailing whitespace waits, one token at most


def test_llama3_plain_text_streams_at_first_char():
    stream = get_tool_parser("llama3").new_stream()
    assert collect(stream.feed(" ")).content == ""  # may still be a JSON call
    assert collect(stream.feed("Sure")).content == " Sure"
    assert collect(stream.feed(', {"name"')).content == ', {"name"'


def test_llama3_call_is_emitted_when_its_object_closes():
    stream = get_tool_parser("llama3").new_stream()
    assert stream.feed('{"name": "a", "parameters": {"q": "}"}') == []  # '}' inside a string
    got = collect(stream.feed('};{"name": "b", '))
    assert got.calls == [("a", '{"q":"}"}')]


# ---------------------------------------------------------------- registry, prompts, formatting


def test_unknown_parser_lists_supported():
    assert set(SUPPORTED_TOOL_PARSERS) == {"hermes", "qwen25", "llama3"}
    with pytest.raises(ValueError, match="hermes, llama3, qwen25"):
        get_tool_parser("mistral")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]


@pytest.mark.parametrize("parser_name", sorted(SUPPORTED_TOOL_PARSERS))
def test_render_tools_prompt(parser_name: str):
    prompt = render_tools_prompt(TOOLS, parser_name)
    assert "get_weather" in prompt and "Current weather in a city" in prompt and "get_time" in prompt
    assert json.dumps(TOOLS[0]["function"]["parameters"]) in prompt
    if parser_name == "llama3":
        assert '"parameters"' in prompt and '";"' in prompt
    else:
        assert "<tool_call>" in prompt and "</tool_call>" in prompt and '"arguments"' in prompt


def test_render_tools_prompt_rejects_bad_tools():
    with pytest.raises(ValueError, match="only 'function'"):
        render_tools_prompt([{"type": "retrieval"}], "hermes")
    with pytest.raises(ValueError, match="name"):
        render_tools_prompt([{"type": "function", "function": {"description": "x"}}], "hermes")
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        render_tools_prompt(TOOLS, "nope")


@pytest.mark.parametrize("parser_name", sorted(SUPPORTED_TOOL_PARSERS))
def test_format_calls_round_trips(parser_name: str):
    parser = get_tool_parser(parser_name)
    calls = [call("get_weather", WEATHER), call("book_trip", TRIP), call("noop", {})]
    text = parser.format_calls(calls)
    assert parser.parse(text) == ParsedReply("", calls)
    assert_stream_matches(parser_name, text, list(text))


def test_llama3_malformed_object_is_content_once_its_braces_close():
    stream = get_tool_parser("llama3").new_stream()
    assert stream.feed('{name: "x", "s": "}"') == []
    assert collect(stream.feed("} and more")).content == '{name: "x", "s": "}"} and more'
