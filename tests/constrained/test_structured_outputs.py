"""Grammar-constrained decoding: every finished output validates, on random
weights (only the mask keeps them valid) and on the embedded default model."""

from __future__ import annotations

import json
import re
import threading

import httpx
import jsonschema
import pytest

from radixserve import Engine
from radixserve.benchmark.tokenizer import get_tokenizer
from tests.conftest import assert_no_leak
from tests.constrained.schemas import REGEXES, SCHEMAS


def check_json(text: str, schema: dict, finish: dict) -> None:
    if finish["type"] == "stop":
        jsonschema.validate(json.loads(text), schema)
    else:  # cut by max_new_tokens: a valid prefix, never garbage
        assert finish["type"] == "length"
        assert text and text[0] in "[{", text


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    # Compact JSON: random weights would otherwise wander in whitespace forever.
    with Engine(model_path=str(tiny_model_factory("llama")), constrained_json_disable_any_whitespace=True) as e:
        yield e


def test_json_schemas_on_random_weights(tiny):
    prompts = [[5 + i, 6, 7] for i in range(len(SCHEMAS))]
    for temperature in (0.0, 1.0):
        params = [{"json_schema": json.dumps(s), "max_new_tokens": 120, "temperature": temperature,
                   "sampling_seed": 11, "n": 3} for s in SCHEMAS]
        outs = tiny.generate(input_ids=prompts, sampling_params=params)
        assert len(outs) == 3 * len(SCHEMAS)
        for i, out in enumerate(outs):
            check_json(out["text"], SCHEMAS[i // 3], out["meta_info"]["finish_reason"])
        finished = sum(o["meta_info"]["finish_reason"]["type"] == "stop" for o in outs)
        assert finished >= 0.9 * len(outs), finished
    assert_no_leak(tiny)


def test_regexes_on_random_weights(tiny):
    prompts = [[40 + i, 41] for i in range(len(REGEXES))]
    for seed in (1, 2, 3):
        outs = tiny.generate(input_ids=prompts, sampling_params=[
            {"regex": r, "max_new_tokens": 40, "temperature": 1.0, "sampling_seed": seed} for r in REGEXES])
        for out, regex in zip(outs, REGEXES):
            assert out["meta_info"]["finish_reason"]["type"] == "stop", out
            assert re.fullmatch(regex, out["text"]), (regex, out["text"])


def test_streamed_constrained_output(tiny):
    schema = SCHEMAS[0]
    chunks = list(tiny.generate(input_ids=[9, 9, 9], stream=True, sampling_params={
        "json_schema": json.dumps(schema), "max_new_tokens": 80, "temperature": 1.0, "sampling_seed": 4}))
    final = chunks[-1]
    check_json(final["text"], schema, final["meta_info"]["finish_reason"])
    assert all(final["text"].startswith(c["text"]) for c in chunks)


def test_ebnf(tiny):
    grammar = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'
    out = tiny.generate(input_ids=[3, 4], sampling_params={"ebnf": grammar, "max_new_tokens": 30, "temperature": 1.0})
    if out["meta_info"]["finish_reason"]["type"] == "stop":
        assert re.fullmatch(r"\(\d(\+\d)*\)", out["text"]), out["text"]
    else:
        assert re.fullmatch(r"\(\d(\+\d)*\+?", out["text"]), out["text"]


@pytest.mark.parametrize("params,message", [
    ({"json_schema": "{not json"}, "json_schema"),
    ({"json_schema": json.dumps({"type": "object", "properties": {"a": {"type": "nonsense"}}})}, "json_schema"),
    ({"regex": "(unclosed"}, "regex"),
    ({"regex": "a", "json_schema": "{}"}, "at most one"),
])
def test_invalid_constraints_are_value_errors(tiny, params, message):
    results = {}

    def valid():
        results["ok"] = tiny.generate(input_ids=[1, 2, 3], sampling_params={
            "regex": "(yes|no)", "max_new_tokens": 5, "temperature": 0})

    t = threading.Thread(target=valid)
    t.start()
    with pytest.raises(ValueError, match=message):
        tiny.generate(input_ids=[1, 2, 3], sampling_params={**params, "max_new_tokens": 5})
    t.join(timeout=60)
    assert results["ok"]["text"] in ("yes", "no")


def test_default_model_json(default_server):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"], "additionalProperties": False}
    prompt = get_tokenizer("SmolLM2-135M-Instruct").apply_chat_template(
        [{"role": "user", "content": "Give the capital of France as JSON."}], tokenize=False,
        add_generation_prompt=True)
    outs = post_generate(default_server, {"text": [prompt] * 2, "sampling_params": [
        {"json_schema": json.dumps(schema), "max_new_tokens": 64, "temperature": t} for t in (0.0, 1.0)]})
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), schema)
    assert "Paris" in outs[0]["text"]
    regex_out = post_generate(default_server, {"text": prompt, "sampling_params": {
        "regex": r"(Paris|London|Berlin)", "max_new_tokens": 8, "temperature": 0}})
    assert regex_out["text"] in ("Paris", "London", "Berlin")


def post_generate(base: str, body: dict):
    r = httpx.post(f"{base}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()
