"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) answers real questions."""

from __future__ import annotations

import httpx

from radixserve.benchmark.tokenizer import get_tokenizer


def generate(base: str, text: str, params: dict) -> dict:
    r = httpx.post(f"{base}/generate", json={"text": text, "sampling_params": params}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_completion_knows_paris(default_server):
    out = generate(default_server, "The capital of France is", {"temperature": 0, "max_new_tokens": 8})
    assert "Paris" in out["text"], out["text"]
    assert out["meta_info"]["completion_tokens"] == len(out["output_ids"]) <= 8


def test_chat_knows_paris(default_server):
    prompt = get_tokenizer("SmolLM2-135M-Instruct").apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True,
    )
    out = generate(default_server, prompt, {"temperature": 0, "max_new_tokens": 32})
    assert "Paris" in out["text"], out["text"]
    # The chat turn ends with <|im_end|>, one of the model's EOS tokens.
    assert out["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    info = httpx.get(f"{default_server}/get_server_info").json()
    assert info["weight_format"] == "int4wo-32"  # the default on the CPU: the file's 4-bit weights
    kv = info["kv_cache"]
    assert kv["in_use_tokens"] == 0, kv
    assert kv["total_tokens"] == kv["free_tokens"] + kv["in_use_tokens"] + kv["cached_tokens"], kv
