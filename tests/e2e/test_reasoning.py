"""Reasoning content through a real server: a tiny random-weight Qwen3 model
served with `--reasoning-parser qwen3` and a Qwen-style chat template that
opens a `<think>` block in the prompt (unless enable_thinking is false).

Random weights never write the tags on their own, so a regex (extra body)
makes the model close the think block: the split is then checked end to end."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.parsers.templates import QWEN_STYLE_TEMPLATE
from tests.server_utils import MODEL, running_server

THOUGHT = r"[a-z]{2,8}( [a-z]{2,8}){0,3}"
ANSWER = r"[A-Z][a-z]{1,8}\."
CLOSED = {"chat_template_kwargs": {"enable_thinking": False}}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
       "required": ["a"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": ADD}}]


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "qwen_style.jinja"
    template.write_text(QWEN_STYLE_TEMPLATE)
    with running_server(tiny_model_factory("qwen3"), "--reasoning-parser", "qwen3", "--chat-template",
                        str(template), "--constrained-json-disable-any-whitespace") as (_, base):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def chat(server: str, **body) -> dict:
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_no_tags_means_all_content(server):
    """Thinking off (the template closes the block): the reply is content, and
    reasoning_content is present and null."""
    split = chat(server, max_tokens=8, temperature=0, **CLOSED)["choices"][0]["message"]
    whole = chat(server, max_tokens=8, temperature=0, separate_reasoning=False, **CLOSED)["choices"][0]["message"]
    assert "reasoning_content" in split and split["reasoning_content"] is None
    assert split["content"] == whole["content"] and whole["content"]


def test_opened_block_is_reasoning_until_closed(server):
    regex = THOUGHT + r"\n</think>\n\n" + ANSWER
    params = dict(max_tokens=60, temperature=1.0, seed=7, n=2, regex=regex)
    split = chat(server, **params)["choices"]
    whole = chat(server, separate_reasoning=False, **params)["choices"]
    for s, w in zip(split, whole):
        reasoning, content = s["message"]["reasoning_content"], s["message"]["content"]
        assert re.fullmatch(THOUGHT, reasoning) and re.fullmatch(ANSWER, content), s
        assert w["message"]["content"] == f"{reasoning}\n</think>\n\n{content}"  # the same sample, unsplit
        assert s["finish_reason"] == "stop"


def test_opened_block_streamed(client, server):
    regex = THOUGHT + r"\n</think>\n\n" + ANSWER
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=60, temperature=1.0, seed=3,
        stream=True, extra_body={"regex": regex})
    reasoning, content = "", ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    whole = chat(server, max_tokens=60, temperature=1.0, seed=3, regex=regex)["choices"][0]["message"]
    assert (reasoning, content) == (whole["reasoning_content"], whole["content"])
    assert re.fullmatch(THOUGHT, reasoning) and re.fullmatch(ANSWER, content)


def test_cut_off_while_thinking(server):
    choice = chat(server, max_tokens=4, temperature=0)["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] is None and choice["message"]["reasoning_content"]


def whole_reply(server: str, body: dict) -> tuple:
    choice = chat(server, **body)["choices"][0]
    msg = choice["message"]
    (call,) = msg["tool_calls"]
    return (msg["reasoning_content"], msg["content"], call["function"]["name"], call["function"]["arguments"],
            choice["finish_reason"])


def streamed_reply(server: str, body: dict) -> tuple:
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, **body}) as r:
        chunks = [json.loads(x[5:]) for x in r.iter_lines() if x.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert {tc["index"] for tc in calls} == {0} and calls[0]["id"].startswith("call_")
    return ("".join(d.get("reasoning_content") or "" for d in deltas),
            "".join(d.get("content") or "" for d in deltas) or None,
            calls[0]["function"]["name"], "".join(tc["function"]["arguments"] for tc in calls),
            chunks[-1]["choices"][0]["finish_reason"])


def test_reasoning_then_tool_call(server):
    """Reasoning is split off first, then the calls are parsed from the rest."""
    regex = THOUGHT + r'\n</think>\n\n<tool_call>\n\{"name": "add", "arguments": \{"a": [0-9]\}\}\n</tool_call>'
    body = dict(tools=TOOLS, max_tokens=80, temperature=1.0, seed=5, regex=regex)
    whole = whole_reply(server, body)
    assert streamed_reply(server, body) == whole  # the same seed, streamed
    reasoning, content, name, args, finish = whole
    assert re.fullmatch(THOUGHT, reasoning) and content is None and finish == "tool_calls" and name == "add"
    jsonschema.validate(json.loads(args), ADD)


def test_forced_call_with_thinking_off(client):
    """chat_template_kwargs reach the template: with thinking off the prompt
    closes the block, so the forced call starts right away."""
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "add"}], tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=40, temperature=1.0, seed=1, extra_body=CLOSED)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.model_extra.get("reasoning_content") is None
    jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments), ADD)
