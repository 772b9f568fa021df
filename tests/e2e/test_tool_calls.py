"""Tool calls through real servers and the official openai client: the
embedded default model (SmolLM2, whose template ignores tools, so the built-in
tool prompt is used) and a tiny random-weight model (only the grammar keeps its
calls valid). Forced calls (tool_choice "required" or a named function) must
always parse and validate against the tool's parameters schema."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from tests.constrained.schemas import SCHEMAS
from tests.server_utils import MODEL, running_server

S = {"type": "string", "maxLength": 24}
# Realistic tools for the default model; strings are bounded so a small model cannot ramble.
REAL_TOOLS = [
    {"name": "get_weather", "description": "Get the current weather in a city",
     "parameters": {"type": "object", "properties": {"city": S, "unit": {"enum": ["celsius", "fahrenheit"]}},
                    "required": ["city", "unit"], "additionalProperties": False}},
    {"name": "book_flight", "description": "Book a flight for a passenger",
     "parameters": {"type": "object", "properties": {
         "passenger": {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0,
                                                                          "maximum": 120}},
                       "required": ["name", "age"], "additionalProperties": False},
         "destination": S, "seats": {"type": "integer", "minimum": 1, "maximum": 9}},
         "required": ["passenger", "destination", "seats"], "additionalProperties": False}},
    {"name": "set_alarm", "description": "Set an alarm on some weekdays",
     "parameters": {"type": "object", "properties": {
         "hour": {"type": "integer", "minimum": 0, "maximum": 23},
         "minute": {"type": "integer", "minimum": 0, "maximum": 59},
         "days": {"type": "array", "items": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
                  "minItems": 1, "maxItems": 7}},
         "required": ["hour", "minute", "days"], "additionalProperties": False}},
    {"name": "search_recipes", "description": "Search recipes by ingredients",
     "parameters": {"type": "object", "properties": {
         "ingredients": {"type": "array", "items": S, "minItems": 1, "maxItems": 4},
         "max_minutes": {"type": "integer", "minimum": 5, "maximum": 240},
         "vegetarian": {"type": "boolean"}},
         "required": ["ingredients"], "additionalProperties": False}},
    {"name": "convert_currency", "description": "Convert an amount of money",
     "parameters": {"type": "object", "properties": {
         "amount": {"type": "number", "minimum": 0, "maximum": 1000000},
         "from": {"enum": ["USD", "EUR", "GBP", "JPY"]}, "to": {"enum": ["USD", "EUR", "GBP", "JPY"]}},
         "required": ["amount", "from", "to"], "additionalProperties": False}},
]
PROMPTS = {
    "get_weather": "What is the weather like in Paris right now?",
    "book_flight": "Book a flight to Tokyo for Alice, who is 34, two seats.",
    "set_alarm": "Wake me up at 6:30 on weekdays.",
    "search_recipes": "Find me a quick vegetarian recipe with tomatoes and rice.",
    "convert_currency": "How much is 250 US dollars in euros?",
}
# Random weights: the bounded schemas of the structured-output tests, as tools.
# The tiny model's context is 512 tokens, so a request offers only a few of them.
RANDOM_TOOLS = [{"name": f"fn_{i}", "parameters": s} for i, s in enumerate(SCHEMAS) if s["type"] == "object"]
SMALL_TOOLS = [RANDOM_TOOLS[i] for i in (1, 2, 7)]


def as_tools(specs: list[dict]) -> list[dict]:
    return [{"type": "function", "function": spec} for spec in specs]


def check_calls(calls, specs: list[dict]) -> None:
    """Every call names one of the tools and its arguments validate."""
    schemas = {s["name"]: s["parameters"] for s in specs}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in schemas, call.function.name
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


@pytest.fixture(scope="module")
def servers(tiny_model_factory, default_server):
    """The session's default-model server, and a tiny-model server of this module's own."""
    with running_server(tiny_model_factory("llama"), "--constrained-json-disable-any-whitespace",
                        "--tool-call-parser", "qwen25") as (_, tiny_base):
        yield {"default": default_server, "tiny": tiny_base}


@pytest.fixture(scope="module")
def default(servers):
    return openai.OpenAI(base_url=f"{servers['default']}/v1", api_key="unused")


@pytest.fixture(scope="module")
def tiny(servers):
    return openai.OpenAI(base_url=f"{servers['tiny']}/v1", api_key="unused")


# ---------------------------------------------------------------- the default model


def test_default_model_named_functions(default):
    """One forced call per tool, all at once (the server batches them)."""
    def ask(spec: dict):
        return default.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPTS[spec["name"]]}],
            tools=as_tools(REAL_TOOLS), tool_choice=named(spec["name"]), max_tokens=120, temperature=0)

    with ThreadPoolExecutor(len(REAL_TOOLS)) as pool:
        outs = list(pool.map(ask, REAL_TOOLS))
    for spec, out in zip(REAL_TOOLS, outs):
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        check_calls(choice.message.tool_calls, [spec])
        assert len(choice.message.tool_calls) == 1
    weather = json.loads(outs[0].choices[0].message.tool_calls[0].function.arguments)
    assert weather["city"] == "Paris"  # a real model fills in what the user said


def test_default_model_required_streamed(default):
    stream = default.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPTS["convert_currency"]}],
        tools=as_tools(REAL_TOOLS), tool_choice="required", parallel_tool_calls=False,
        max_tokens=120, temperature=0, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        choice = chunk.choices[0]
        for tc in choice.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                entry["id"], entry["name"] = tc.id, tc.function.name
            entry["arguments"] += tc.function.arguments or ""
        assert not choice.delta.content  # a forced reply is only calls
        finish = choice.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    call = calls[0]
    assert call["id"].startswith("call_") and call["name"] in PROMPTS
    spec = next(s for s in REAL_TOOLS if s["name"] == call["name"])
    jsonschema.validate(json.loads(call["arguments"]), spec["parameters"])


def test_default_model_required_n2(default):
    out = default.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPTS["set_alarm"]}],
        tools=as_tools(REAL_TOOLS), tool_choice="required", parallel_tool_calls=False,
        max_tokens=120, temperature=0.8, seed=5, n=2)
    assert len(out.choices) == 2
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls, REAL_TOOLS)


# ---------------------------------------------------------------- random weights


def test_random_weights_named_functions(tiny):
    """Every bounded schema as a forced call, temperature 1, three samples each."""
    def ask(i: int):
        spec = RANDOM_TOOLS[i]
        offered = [spec, SMALL_TOOLS[i % 3]] if spec not in SMALL_TOOLS else [spec]
        return spec, tiny.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"call {spec['name']}"}],
            tools=as_tools(offered), tool_choice=named(spec["name"]), max_tokens=160,
            temperature=1.0, seed=i, n=3)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, range(len(RANDOM_TOOLS))))
    for spec, out in results:
        for choice in out.choices:
            assert choice.finish_reason == "tool_calls", (spec["name"], choice)
            check_calls(choice.message.tool_calls, [spec])


def test_random_weights_required(tiny):
    """Any tool, one or several calls; streamed with one call per reply."""
    many = tiny.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "do things"}], tools=as_tools(SMALL_TOOLS),
        tool_choice="required", max_tokens=150, temperature=1.0, seed=3, n=3)
    for choice in many.choices:
        if choice.finish_reason == "tool_calls":
            assert choice.message.content is None
            check_calls(choice.message.tool_calls, SMALL_TOOLS)
        else:  # several calls may run out of tokens; the finished ones still parse
            assert choice.finish_reason == "length"
            if choice.message.tool_calls:
                check_calls(choice.message.tool_calls, SMALL_TOOLS)
    for seed in (1, 2):  # streamed, two choices each
        stream = tiny.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "do one thing"}], tools=as_tools(SMALL_TOOLS),
            tool_choice="required", parallel_tool_calls=False, max_tokens=160, temperature=1.0, seed=seed,
            n=2, stream=True)
        chunks = [c for c in stream if c.choices]
        for index in (0, 1):
            mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
            deltas = [tc for c in mine for tc in (c.delta.tool_calls or [])]
            assert deltas[0].id and deltas[0].function.name and all(d.index == 0 for d in deltas)
            args = "".join(d.function.arguments or "" for d in deltas)
            spec = next(s for s in SMALL_TOOLS if s["name"] == deltas[0].function.name)
            jsonschema.validate(json.loads(args), spec["parameters"])
            assert [c.finish_reason for c in mine if c.finish_reason] == ["tool_calls"]


def test_auto_parses_calls_the_model_writes(tiny):
    """A regex makes the random model write a call in the qwen25 format; with
    tool_choice auto the reply is parsed into text and a call."""
    regex = r'Adding\.\n<tool_call>\n\{"name": "fn_0", "arguments": \{"name": "[a-z]{1,6}", "age": [1-9]\}\}\n</tool_call>'
    for stream in (False, True):
        out = tiny.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "add"}], tools=as_tools(RANDOM_TOOLS[:1]),
            max_tokens=80, temperature=1.0, seed=2, stream=stream, extra_body={"regex": regex})
        if stream:
            chunks = list(out)
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
            name, args = deltas[0].function.name, "".join(d.function.arguments or "" for d in deltas)
            finish = chunks[-1].choices[0].finish_reason
        else:
            msg = out.choices[0].message
            content, finish = msg.content, out.choices[0].finish_reason
            (call,) = msg.tool_calls
            name, args = call.function.name, call.function.arguments
        assert (content, name, finish) == ("Adding.", "fn_0", "tool_calls")
        jsonschema.validate(json.loads(args), RANDOM_TOOLS[0]["parameters"])


def test_auto_and_none_without_calls(tiny):
    for choice in ("auto", "none"):
        out = tiny.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], tools=as_tools(SMALL_TOOLS),
            tool_choice=choice, max_tokens=8, temperature=0)
        msg = out.choices[0].message
        assert msg.tool_calls is None and isinstance(msg.content, str)
        assert out.choices[0].finish_reason in ("stop", "length")
    # "none" does not show the tools to the model: the prompt is the plain one.
    plain = tiny.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                         max_tokens=1, temperature=0)
    none = tiny.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                        tools=as_tools(SMALL_TOOLS), tool_choice="none", max_tokens=1)
    auto = tiny.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                        tools=as_tools(SMALL_TOOLS), max_tokens=1)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens


def test_history_with_calls_and_results(tiny):
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "fn_0", "arguments": '{"name": "Paris", "age": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
    ]
    out = tiny.chat.completions.create(model=MODEL, messages=history, tools=as_tools(RANDOM_TOOLS[:2]),
                                       tool_choice=named("fn_1"), max_tokens=60, temperature=0)
    assert out.choices[0].finish_reason == "tool_calls"
    check_calls(out.choices[0].message.tool_calls, [RANDOM_TOOLS[1]])


@pytest.mark.parametrize("body,field", [
    ({"tools": as_tools(RANDOM_TOOLS[:2]), "tool_choice": named("missing")}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": as_tools(RANDOM_TOOLS[:2]), "tool_choice": "always"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "nonsense"}}}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
])
def test_bad_tool_requests_are_400(servers, tiny, body, field):
    base = servers["tiny"]
    result = {}

    def valid():
        result["out"] = tiny.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], tools=as_tools(RANDOM_TOOLS[:2]),
            tool_choice="required", parallel_tool_calls=False, max_tokens=80, temperature=0)

    worker = threading.Thread(target=valid)
    worker.start()
    for stream in (False, True):
        r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": stream, **body})
        assert r.status_code == 400, r.text
        assert field in r.json()["error"]["message"], r.json()
    worker.join(timeout=60)
    assert result["out"].choices[0].finish_reason == "tool_calls"
