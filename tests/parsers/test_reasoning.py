"""Reasoning parsers on realistic replies: whole and streamed at every split
point and random chunkings; streamed results must equal the whole-reply split."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixserve.parsers.reasoning import (
    SUPPORTED_REASONING_PARSERS,
    ReasoningDelta,
    StartMode,
    get_reasoning_parser,
)

HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

THOUGHT = "The user asks for 17 × 23. 17 × 20 = 340, 17 × 3 = 51, so 391.\nDouble-check: 391 / 17 = 23. ✓"

# (parser name, think_opened, fixture name, text, expected (reasoning, content))
FIXTURES: list[tuple[str, bool | None, str, str, tuple[str, str]]] = [
    ("qwen3", None, "both_tags", f"<think>\n{THOUGHT}\n</think>\n\n17 × 23 = **391**.", (THOUGHT, "17 × 23 = **391**.")),
    ("qwen3", None, "only_closing_tag", f"{THOUGHT}\n</think>\n\nIt is 391.", (THOUGHT, "It is 391.")),
    ("qwen3", None, "empty_reasoning", "<think>\n\n</think>\n\nHello! How can I help you today?",
     ("", "Hello! How can I help you today?")),
    ("qwen3", None, "no_tags", "Hello! How can I help you today?\n", ("", "Hello! How can I help you today?\n")),
    ("qwen3", None, "unterminated", "<think>\nLet me think about Zoë's question", ("Let me think about Zoë's question", "")),
    ("qwen3", None, "tag_mentioned_in_content", "<think>ok</think>Use <think> and </think> tags.",
     ("ok", "Use <think> and </think> tags.")),
    ("qwen3", None, "angle_brackets", "<thinking is not a tag> a < b </thin", ("", "<thinking is not a tag> a < b </thin")),
    ("qwen3", True, "opened_only_closing", f"{THOUGHT}</think>391", (THOUGHT, "391")),
    ("qwen3", True, "opened_still_thinking", "Hmm, 17 × 23…", ("Hmm, 17 × 23…", "")),
    ("qwen3", False, "closed_no_tags", "Okay.</think> still content", ("", "Okay.</think> still content")),
    ("qwen3", False, "closed_with_tags", "<think>\nhmm\n</think>\n\nHi.", ("hmm", "Hi.")),
    ("deepseek-r1", None, "both_tags", f"<think>\n{THOUGHT}\n</think>\n\n**391**", (THOUGHT, "**391**")),
    ("deepseek-r1", None, "only_closing_tag", f"{THOUGHT}\n</think>\n\n**391**", (THOUGHT, "**391**")),
    ("deepseek-r1", None, "empty_reasoning", "\n</think>\n\nHi!", ("", "Hi!")),
    ("deepseek-r1", None, "no_tags_still_thinking", "Okay, so the user wants 17 × 23. Let me",
     ("Okay, so the user wants 17 × 23. Let me", "")),
    ("deepseek-r1", None, "unicode_multiline", "<think>\n考虑一下。\n\n嗯 🤔\n</think>\n答案是 391。\n",
     ("考虑一下。\n\n嗯 🤔", "答案是 391。\n")),
]
IDS = [f"{p}-{o}-{n}" for p, o, n, _, _ in FIXTURES]


def run_stream(name: str, think_opened: bool | None, chunks: list[str]) -> tuple[str, str]:
    stream = get_reasoning_parser(name, think_opened=think_opened).new_stream()
    events: list[ReasoningDelta] = []
    for chunk in chunks:
        events += stream.feed(chunk)
    events += stream.finish()
    return collect(events)


def collect(events: list[ReasoningDelta]) -> tuple[str, str]:
    for ev in events:  # exactly one side set, never empty
        assert (ev.reasoning is None) != (ev.content is None) and (ev.reasoning or ev.content)
    return "".join(e.reasoning or "" for e in events), "".join(e.content or "" for e in events)


def assert_stream_matches(name: str, think_opened: bool | None, text: str, chunks: list[str]) -> None:
    assert "".join(chunks) == text
    expected = get_reasoning_parser(name, think_opened=think_opened).parse(text)
    assert run_stream(name, think_opened, chunks) == expected, chunks


def splits(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("name,opened,fixture,text,expected", FIXTURES, ids=IDS)
def test_fixture_parse(name, opened, fixture, text, expected):
    assert get_reasoning_parser(name, think_opened=opened).parse(text) == expected


@pytest.mark.parametrize("name,opened,fixture,text,expected", FIXTURES, ids=IDS)
def test_fixture_stream_every_split_point(name, opened, fixture, text, expected):
    for cut in range(len(text) + 1):
        assert_stream_matches(name, opened, text, splits(text, [cut]))
    assert_stream_matches(name, opened, text, list(text))


@HYPO
@given(fixture=st.sampled_from(FIXTURES), data=st.data())
def test_fixture_stream_random_chunkings(fixture, data):
    name, opened, _, text, _ = fixture
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert_stream_matches(name, opened, text, splits(text, cuts))


FRAGMENTS = ["<think>", "</think>", "<thi", "nk>", "</", "<", ">", "\n", " ", "\n\n", "word", "é🙂", "x"]


@HYPO
@given(
    config=st.sampled_from([("qwen3", None), ("qwen3", True), ("qwen3", False), ("deepseek-r1", None)]),
    data=st.data(),
)
def test_random_replies_stream_equals_parse(config, data):
    text = "".join(data.draw(st.lists(st.sampled_from(FRAGMENTS), max_size=10)))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    assert_stream_matches(*config, text, splits(text, cuts))


def test_modes():
    assert get_reasoning_parser("qwen3").mode is StartMode.AUTO
    assert get_reasoning_parser("deepseek-r1").mode is StartMode.OPENED
    assert get_reasoning_parser("qwen3", think_opened=True).mode is StartMode.OPENED
    assert get_reasoning_parser("deepseek-r1", think_opened=False).mode is StartMode.CLOSED


def test_unknown_parser_lists_supported():
    assert set(SUPPORTED_REASONING_PARSERS) == {"qwen3", "deepseek-r1"}
    with pytest.raises(ValueError, match="deepseek-r1, qwen3"):
        get_reasoning_parser("glm45")


def test_reasoning_streams_as_it_comes_and_holds_partial_close_tag():
    stream = get_reasoning_parser("deepseek-r1").new_stream()
    assert collect(stream.feed("<think>\nStep one")) == ("Step one", "")
    assert collect(stream.feed(". Done.\n</th")) == (". Done.", "")  # "\n</th" may be the tag
    assert collect(stream.feed("ink>\n\nAnswer")) == ("", "Answer")
    assert stream.finish() == []


def test_closed_mode_streams_content_at_once():
    stream = get_reasoning_parser("qwen3", think_opened=False).new_stream()
    assert collect(stream.feed("<")) == ("", "")  # may still be <think>
    assert collect(stream.feed("b>Hi")) == ("", "<b>Hi")


def test_auto_mode_holds_untagged_text_until_decided():
    # Without the hint, untagged text may still turn out to be reasoning.
    stream = get_reasoning_parser("qwen3").new_stream()
    assert stream.feed("Hello") == []
    assert collect(stream.finish()) == ("", "Hello")
