"""Sampling, stops, penalties, streaming, n, abort and bad input through one Engine."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from radixserve import Engine
from tests.conftest import assert_no_leak, generate_then_abort, load_hf_model

PROMPT = [15, 400, 2311, 98, 7, 1200, 64, 3]


@pytest.fixture(scope="module")
def setup(tiny_model_factory):
    path = tiny_model_factory("llama")
    engine = Engine(model_path=str(path))
    yield engine, load_hf_model(path)
    engine.shutdown()


def gen(engine, ids=PROMPT, **params):
    params.setdefault("max_new_tokens", 16)
    params.setdefault("ignore_eos", True)
    return engine.generate(input_ids=ids, sampling_params=params)


def reference_greedy(hf, ids, steps, freq=0.0, pres=0.0, bias=None):
    """Greedy decoding with OpenAI frequency/presence penalties and logit bias,
    written directly on transformers' logits."""
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = hf(torch.tensor([ids + out])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
        logits = logits - freq * counts - pres * (counts > 0).float()
        for tok, b in (bias or {}).items():
            logits[int(tok)] += b
        out.append(int(logits.argmax()))
    return out


def test_top_k_1_equals_greedy(setup):
    engine, _ = setup
    greedy = gen(engine, temperature=0)
    topk1 = gen(engine, temperature=1.0, top_k=1, sampling_seed=5)
    assert topk1["output_ids"] == greedy["output_ids"]
    assert_no_leak(engine)


def test_seed_same_alone_and_in_batch(setup):
    engine, _ = setup
    params = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 12, "ignore_eos": True}
    alone = engine.generate(input_ids=PROMPT, sampling_params={**params, "sampling_seed": 42})
    others = [[5, 6, 7, 8 + i] * (i + 1) for i in range(5)]
    batch = engine.generate(
        input_ids=others[:2] + [PROMPT] + others[2:],
        sampling_params=[{**params, "sampling_seed": 100 + i} for i in range(2)]
        + [{**params, "sampling_seed": 42}] + [{**params} for _ in range(3)],
    )
    assert batch[2]["output_ids"] == alone["output_ids"]
    different = engine.generate(input_ids=PROMPT, sampling_params={**params, "sampling_seed": 43})
    assert different["output_ids"] != alone["output_ids"]


def test_n_samples_prompt_major_with_shifted_seeds(setup):
    engine, _ = setup
    params = {"temperature": 1.0, "max_new_tokens": 8, "ignore_eos": True, "sampling_seed": 7, "n": 3}
    prompts = [PROMPT, PROMPT[:4]]
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    assert len(outs) == 6
    for p, ids in enumerate(prompts):
        for i in range(3):
            single = gen(engine, ids, temperature=1.0, max_new_tokens=8, sampling_seed=7 + i)
            assert outs[p * 3 + i]["output_ids"] == single["output_ids"]
            assert outs[p * 3 + i]["meta_info"]["prompt_tokens"] == len(ids)


def test_stop_token_ids(setup):
    engine, _ = setup
    tok = engine.tokenizer
    full = gen(engine, temperature=0, max_new_tokens=20)["output_ids"]
    stop_id = full[5]
    k = full.index(stop_id)
    out = gen(engine, temperature=0, max_new_tokens=20, stop_token_ids=[stop_id])
    assert out["output_ids"] == full[: k + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert out["text"] == tok.decode(full[:k])
    kept = gen(engine, temperature=0, max_new_tokens=20, stop_token_ids=[stop_id], no_stop_trim=True)
    assert kept["text"] == tok.decode(full[: k + 1])


def test_stop_string_spanning_tokens(setup):
    engine, _ = setup
    tok = engine.tokenizer
    full = gen(engine, temperature=0, max_new_tokens=24)
    pieces = [tok.decode([t]) for t in full["output_ids"]]
    # A stop string made of the end of token 6 and the start of token 7.
    stop = pieces[6][-2:] + pieces[7][:2]
    assert len(stop) >= 2
    text = full["text"]
    expected = text[: text.find(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(engine.generate(input_ids=PROMPT, stream=True, sampling_params={
                "temperature": 0, "max_new_tokens": 24, "ignore_eos": True, "stop": [stop]}))
            out = chunks[-1]
            # Cumulative text never shows a partial stop string.
            assert all(expected.startswith(c["text"]) for c in chunks)
        else:
            out = gen(engine, temperature=0, max_new_tokens=24, stop=stop)
        assert out["text"] == expected
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        ids = out["output_ids"]
        # Nothing decoded past the stop: the last token completed it, the one before did not.
        assert stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])
        assert ids == full["output_ids"][: len(ids)]
        assert out["meta_info"]["completion_tokens"] == len(ids)
    kept = gen(engine, temperature=0, max_new_tokens=24, stop=stop, no_stop_trim=True)
    assert kept["text"].startswith(expected + stop)


def test_penalties_and_logit_bias_match_reference(setup):
    engine, hf = setup
    for params in ({"frequency_penalty": 1.5}, {"presence_penalty": 1.5},
                   {"logit_bias": {"77": 5.0, "1234": 3.0}}):
        out = gen(engine, temperature=0, max_new_tokens=10, **params)
        ref = reference_greedy(hf, PROMPT, 10, freq=params.get("frequency_penalty", 0.0),
                               pres=params.get("presence_penalty", 0.0), bias=params.get("logit_bias"))
        assert out["output_ids"] == ref, params
    plain = gen(engine, temperature=0, max_new_tokens=10)["output_ids"]
    forced = gen(engine, temperature=0, max_new_tokens=10, logit_bias={"77": 100.0})["output_ids"]
    assert forced == [77] * 10 and plain != forced


def test_repetition_penalty_matches_transformers(setup):
    engine, hf = setup
    out = gen(engine, temperature=0, max_new_tokens=10, repetition_penalty=1.5)
    x = torch.tensor([PROMPT])
    ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, min_new_tokens=10,
                      do_sample=False, repetition_penalty=1.5, pad_token_id=0)
    assert out["output_ids"] == ref[0, len(PROMPT):].tolist()


def test_min_new_tokens_blocks_eos(setup):
    engine, _ = setup
    eos = 2
    out = engine.generate(input_ids=PROMPT, sampling_params={
        "temperature": 0, "max_new_tokens": 12, "min_new_tokens": 12, "logit_bias": {str(eos): 100.0}})
    assert len(out["output_ids"]) == 12 and eos not in out["output_ids"]
    early = engine.generate(input_ids=PROMPT, sampling_params={
        "temperature": 0, "max_new_tokens": 12, "min_new_tokens": 3, "logit_bias": {str(eos): 100.0}})
    assert early["output_ids"][-1] == eos and len(early["output_ids"]) == 4
    assert early["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}


def test_streaming_cumulative_text(setup):
    engine, _ = setup
    full = gen(engine, temperature=0, max_new_tokens=16)
    chunks = list(engine.generate(input_ids=PROMPT, stream=True, sampling_params={
        "temperature": 0, "max_new_tokens": 16, "ignore_eos": True}))
    assert len(chunks) > 1
    assert chunks[-1]["text"] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]
    for a, b in zip(chunks, chunks[1:]):
        assert b["text"].startswith(a["text"])


def test_async_generate_and_stream(setup):
    engine, _ = setup
    full = gen(engine, temperature=0, max_new_tokens=8)

    async def main():
        one = await engine.async_generate(input_ids=PROMPT, sampling_params={
            "temperature": 0, "max_new_tokens": 8, "ignore_eos": True})
        stream = await engine.async_generate(input_ids=PROMPT, stream=True, sampling_params={
            "temperature": 0, "max_new_tokens": 8, "ignore_eos": True})
        chunks = [c async for c in stream]
        return one, chunks

    one, chunks = asyncio.run(main())
    assert one["output_ids"] == full["output_ids"] == chunks[-1]["output_ids"]


def test_abort_frees_memory(setup):
    engine, _ = setup
    out = generate_then_abort(engine, PROMPT, "to-abort")
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(out["output_ids"]) < 400
    assert_no_leak(engine)


BAD = [
    ({"prompt": ""}, "prompt"),
    ({"input_ids": [1] * 600}, "context"),
    ({"sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"sampling_params": {"max_new_tokens": 2.5}}, "max_new_tokens"),
    ({"sampling_params": {"temperature": -0.5}}, "temperature"),
    ({"sampling_params": {"top_p": 0.0}}, "top_p"),
    ({"sampling_params": {"top_p": 1.5}}, "top_p"),
    ({"sampling_params": {"bogus_key": 1}}, "bogus_key"),
    ({"input_ids": [1, 2, 10**7]}, "input_ids"),
]


@pytest.mark.parametrize("kwargs,field", BAD)
def test_bad_input_raises_and_others_finish(setup, kwargs, field):
    engine, _ = setup
    results = {}

    def run_valid():
        results["ok"] = gen(engine, temperature=0, max_new_tokens=24)

    t = threading.Thread(target=run_valid)
    t.start()
    call = {"input_ids": PROMPT} if "prompt" not in kwargs and "input_ids" not in kwargs else {}
    call.update(kwargs)
    with pytest.raises(ValueError, match=field):
        engine.generate(**call)
    t.join(timeout=60)
    assert len(results["ok"]["output_ids"]) == 24
    assert_no_leak(engine)


def test_server_info_and_flush(setup):
    engine, _ = setup
    info = engine.get_server_info()
    for key in ("max_total_num_tokens", "num_running_reqs", "num_waiting_reqs", "weight_version"):
        assert key in info
    kv = info["kv_cache"]
    assert kv["total_tokens"] == info["max_total_num_tokens"]
    assert engine.flush_cache() is True


def test_logprob_texts(setup):
    engine, _ = setup
    out = engine.generate(input_ids=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 4},
                          return_logprob=True, top_logprobs_num=2, return_text_in_logprobs=True)
    for lp, tid, text in out["meta_info"]["output_token_logprobs"]:
        assert text == engine.tokenizer.decode([tid]) and lp <= 0
    assert all(len(top) == 2 for top in out["meta_info"]["output_top_logprobs"])


def test_incremental_streaming_output(tiny_model_factory):
    with Engine(model_path=str(tiny_model_factory("llama")), incremental_streaming_output=True) as engine:
        params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
        full = engine.generate(input_ids=PROMPT, sampling_params=params)
        chunks = list(engine.generate(input_ids=PROMPT, sampling_params=params, stream=True))
        assert len(chunks) > 1
        assert "".join(c["text"] for c in chunks) == full["text"]
        assert [t for c in chunks for t in c["output_ids"]] == full["output_ids"]


def test_bfloat16_close_to_float32(setup, tiny_model_factory):
    engine, _ = setup
    params = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    ref = engine.generate(input_ids=PROMPT, sampling_params=params, return_logprob=True)
    with Engine(model_path=str(tiny_model_factory("llama")), dtype="bfloat16") as bf16:
        assert bf16.get_server_info()["dtype"] == "bfloat16"
        out = bf16.generate(input_ids=PROMPT, sampling_params=params, return_logprob=True)
    # Same first token, and its logprob within bfloat16 rounding of float32's.
    assert out["output_ids"][0] == ref["output_ids"][0]
    lp32 = ref["meta_info"]["output_token_logprobs"][0][0]
    lp16 = out["meta_info"]["output_token_logprobs"][0][0]
    assert abs(lp32 - lp16) < 0.1, (lp32, lp16)
