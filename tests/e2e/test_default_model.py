"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) answers real questions."""

from __future__ import annotations

import pytest

from radixserve import Engine
from tests.conftest import assert_no_leak


@pytest.fixture(scope="module")
def engine():
    with Engine() as e:
        yield e


def test_completion_knows_paris(engine):
    out = engine.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 8})
    assert "Paris" in out["text"], out["text"]
    assert out["meta_info"]["completion_tokens"] == len(out["output_ids"]) <= 8


def test_chat_knows_paris(engine):
    tok = engine.get_tokenizer()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True,
    )
    out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 32})
    assert "Paris" in out["text"], out["text"]
    # The chat turn ends with <|im_end|>, one of the model's EOS tokens.
    assert out["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    assert_no_leak(engine)
