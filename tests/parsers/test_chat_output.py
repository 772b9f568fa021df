"""The chat endpoint's reply assembly (reasoning split, then tool calls) on
fixtures: whole replies and every streaming split point must give the same
message, in OpenAI's shape."""

from __future__ import annotations

import json

import pytest

from radixserve.entrypoints.openai.chat_output import (
    ChatReply,
    ChoiceStream,
    OutputParsing,
    choice_finish_reason,
    parse_reply,
    reply_message,
)
from radixserve.parsers.tool_call import ToolCall

HERMES = OutputParsing(tool_parser="hermes")
LLAMA3 = OutputParsing(tool_parser="llama3")
QWEN3 = OutputParsing(reasoning_parser="qwen3")
QWEN3_OPENED = OutputParsing(reasoning_parser="qwen3", think_opened=True)
R1 = OutputParsing(reasoning_parser="deepseek-r1")
BOTH_OPENED = OutputParsing(tool_parser="qwen25", reasoning_parser="qwen3", think_opened=True)
PLAIN = OutputParsing()

WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
WEATHER = ToolCall("get_weather", '{"city":"Paris","unit":"celsius"}')
TIME = ToolCall("get_time", '{"tz":"Europe/Paris"}')

# (name, parsing, text, expected reply)
FIXTURES: list[tuple[str, OutputParsing, str, ChatReply]] = [
    ("hermes_text_and_call", HERMES, "Let me check.\n\n" + WEATHER_CALL, ChatReply("Let me check.", None, [WEATHER])),
    ("hermes_only_call", HERMES, WEATHER_CALL, ChatReply(None, None, [WEATHER])),
    ("hermes_two_calls", HERMES,
     WEATHER_CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
     ChatReply(None, None, [WEATHER, TIME])),
    ("hermes_no_call", HERMES, "It is sunny in Paris.", ChatReply("It is sunny in Paris.", None, [])),
    ("hermes_broken_call_is_content", HERMES, "<tool_call>\n{\"name\": \"get_weather\", \"argum",
     ChatReply("<tool_call>\n{\"name\": \"get_weather\", \"argum", None, [])),
    ("llama3_call", LLAMA3, '{"name": "get_time", "parameters": {"tz": "Europe/Paris"}}', ChatReply(None, None, [TIME])),
    ("llama3_text", LLAMA3, "Paris is in France.", ChatReply("Paris is in France.", None, [])),
    ("qwen3_both_tags", QWEN3, "<think>\nThe user greets me.\n</think>\n\nHello!",
     ChatReply("Hello!", "The user greets me.", [])),
    ("qwen3_no_tags", QWEN3, "Hello there.", ChatReply("Hello there.", None, [])),
    ("qwen3_opened_closing_only", QWEN3_OPENED, "Count: 1, 2, 3.\n</think>\n\nThree.",
     ChatReply("Three.", "Count: 1, 2, 3.", [])),
    ("qwen3_opened_still_thinking", QWEN3_OPENED, "Still thinking about", ChatReply(None, "Still thinking about", [])),
    ("r1_closing_only", R1, "Hmm.\n</think>\n\n**391**", ChatReply("**391**", "Hmm.", [])),
    ("reasoning_then_call", BOTH_OPENED, "Weather needs a tool.\n</think>\n\n" + WEATHER_CALL,
     ChatReply(None, "Weather needs a tool.", [WEATHER])),
    ("reasoning_then_text_and_call", BOTH_OPENED, "Plan.</think>\n\nChecking.\n" + WEATHER_CALL,
     ChatReply("Checking.", "Plan.", [WEATHER])),
    ("plain_keeps_text", PLAIN, "  anything <think> goes\n", ChatReply("  anything <think> goes\n", None, [])),
    ("plain_empty", PLAIN, "", ChatReply("", None, [])),
]
IDS = [f[0] for f in FIXTURES]


def stream_reply(parsing: OutputParsing, chunks: list[str]) -> tuple[ChatReply, list[dict]]:
    """Run the stream and rebuild the reply from its deltas, as a client does."""
    stream = ChoiceStream(parsing)
    deltas: list[dict] = []
    for chunk in chunks:
        deltas += stream.feed(chunk)
    deltas += stream.finish()
    content, reasoning, calls = "", "", {}
    for d in deltas:
        assert len(d) == 1 and next(iter(d.values())), d  # one non-empty field per delta
        content += d.get("content", "")
        reasoning += d.get("reasoning_content", "")
        for tc in d.get("tool_calls", []):
            entry = calls.setdefault(tc["index"], {"name": None, "arguments": ""})
            if "id" in tc:  # the first delta of a call: id, type, name, empty arguments
                assert entry["name"] is None and tc["id"].startswith("call_") and tc["type"] == "function"
                entry["name"] = tc["function"]["name"]
            entry["arguments"] += tc["function"]["arguments"]
    tool_calls = [ToolCall(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]
    assert sorted(calls) == list(range(len(calls)))
    assert stream.has_calls == bool(tool_calls)
    return ChatReply(content, reasoning or None, tool_calls), deltas


def comparable(reply: ChatReply) -> tuple:
    """Streamed content has no null: "" there is null in the whole message."""
    return (reply.content or "", reply.reasoning_content, reply.tool_calls)


@pytest.mark.parametrize("name,parsing,text,expected", FIXTURES, ids=IDS)
def test_whole_reply(name, parsing, text, expected):
    assert parse_reply(text, parsing) == expected


@pytest.mark.parametrize("name,parsing,text,expected", FIXTURES, ids=IDS)
def test_stream_every_split_point(name, parsing, text, expected):
    assert comparable(stream_reply(parsing, [text])[0]) == comparable(expected)
    for i in range(len(text) + 1):
        assert comparable(stream_reply(parsing, [text[:i], text[i:]])[0]) == comparable(expected), i


@pytest.mark.parametrize("name,parsing,text,expected", FIXTURES, ids=IDS)
def test_stream_char_by_char(name, parsing, text, expected):
    assert comparable(stream_reply(parsing, list(text))[0]) == comparable(expected)


def test_message_shape():
    msg = reply_message(parse_reply("Checking.\n" + WEATHER_CALL, HERMES), HERMES)
    assert msg["role"] == "assistant" and msg["content"] == "Checking."
    assert "reasoning_content" not in msg  # no reasoning parser: no key
    (call,) = msg["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    both = OutputParsing(tool_parser="qwen25", reasoning_parser="qwen3")
    only_call = reply_message(parse_reply(WEATHER_CALL, both), both)
    assert only_call["content"] is None and only_call["reasoning_content"] is None
    assert only_call["tool_calls"][0]["function"]["name"] == "get_weather"
    # An opened think block that never closes is all reasoning, even a call inside it.
    still_thinking = reply_message(parse_reply(WEATHER_CALL, BOTH_OPENED), BOTH_OPENED)
    assert still_thinking["content"] is None and "tool_calls" not in still_thinking
    no_tag = reply_message(parse_reply("plain words", QWEN3), QWEN3)
    assert no_tag == {"role": "assistant", "content": "plain words", "reasoning_content": None}
    no_call = reply_message(parse_reply("plain words", HERMES), HERMES)
    assert "tool_calls" not in no_call and no_call["content"] == "plain words"


def test_call_ids_are_unique():
    msg = reply_message(parse_reply(WEATHER_CALL + "\n" + WEATHER_CALL, HERMES), HERMES)
    ids = [c["id"] for c in msg["tool_calls"]]
    assert len(set(ids)) == 2


def test_finish_reason():
    assert choice_finish_reason("stop", True) == "tool_calls"
    assert choice_finish_reason("stop", False) == "stop"
    assert choice_finish_reason("length", True) == "length"  # cut off: the client must know
    assert choice_finish_reason(None, True) is None


def test_stream_sends_few_chunks():
    """Text of one feed goes out as one delta, not one per parser event."""
    _, deltas = stream_reply(QWEN3_OPENED, ["a b c d </think>\n\nx y z"])
    assert deltas == [{"reasoning_content": "a b c d"}, {"content": "x y z"}]
    _, deltas = stream_reply(HERMES, ["Checking.\n" + WEATHER_CALL])
    assert [next(iter(d)) for d in deltas] == ["content", "tool_calls", "tool_calls"]
