"""Incremental detokenization equals decoding everything at once, also when
multi-byte characters are split across tokens."""

from __future__ import annotations

import pytest

from radixserve.managers.detokenizer_manager import IncrementalDetokenizer
from radixserve.managers.io_struct import ReqOutput

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "日本語のテキストと emoji 🎉🚀 mixed with ASCII.",
    "Ünïcödé ça va? Ελληνικά, русский, العربية.",
]


@pytest.fixture(scope="module")
def tokenizer(embedded_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_tokenizer_dir)


def out(rid, ids, finished=None, hold=0, no_trim=False):
    return ReqOutput(rid=rid, new_token_ids=ids, finished_reason=finished, prompt_tokens=1,
                     completion_tokens=0, cached_tokens=0, stop_hold_back=hold, no_stop_trim=no_trim)


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        o = detok.step(out("r", [t], {"type": "length"} if last else None))
        assert "\ufffd" not in o.new_text
        pieces.append(o.new_text)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert detok.states == {}


def test_stop_string_trimmed_and_held_back(tokenizer):
    ids = tokenizer.encode("alpha beta gamma delta")
    detok = IncrementalDetokenizer(tokenizer)
    shown = ""
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        fin = {"type": "stop", "matched": "delta"} if last else None
        shown += detok.step(out("r", [t], fin, hold=len("delta") - 1)).new_text
        if not last:
            assert "delt" not in shown
    assert shown == "alpha beta gamma "
