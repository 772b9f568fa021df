"""LoRA over HTTP: lora_path on /generate, OpenAI model names ("base:adapter"
or the adapter's name), /v1/models, admin-keyed load/unload while a request
runs, and 400s naming the field for bad adapters and unknown names."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.lora.conftest import make_adapter, reference_greedy
from tests.server_utils import MODEL, running_server

NEW_TOKENS = 8
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
PROMPTS = [[101, 2002, 3003, 404, 55, 606, 77], [9, 8000, 700, 6000, 50, 4000, 30, 2000, 10, 111, 222]]
ADMIN = {"Authorization": "Bearer adm"}


@pytest.fixture(scope="module")
def server(lora_setup):
    setup = lora_setup("llama")
    lora_paths = [f"attn={setup['attn']}", f"mlp={setup['mlp']}"]
    with running_server(setup["base"], "--lora-paths", *lora_paths, "--max-loras-per-batch", "2",
                        "--admin-api-key", "adm") as (_, base):
        yield base, setup


def generate(base: str, **body) -> httpx.Response:
    return httpx.post(base + "/generate", json={"sampling_params": GREEDY, **body}, timeout=120)


def test_generate_and_openai_names_select_the_adapter(server):
    base, setup = server
    want = {n: reference_greedy(setup["base"], setup.get(n), PROMPTS, NEW_TOKENS) for n in ("attn", "mlp", None)}
    out = generate(base, input_ids=PROMPTS * 3, lora_path=["attn", "attn", "mlp", "mlp", None, None]).json()
    assert [o["output_ids"] for o in out] == want["attn"] + want["mlp"] + want[None]
    for model, name in ((f"{MODEL}:attn", "attn"), ("mlp", "mlp"), (MODEL, None)):
        r = httpx.post(base + "/v1/completions", timeout=120, json={
            "model": model, "prompt": PROMPTS[1], "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        native = generate(base, input_ids=PROMPTS[1], lora_path=name).json()
        assert r.json()["choices"][0]["text"] == native["text"], model


def test_models_lists_the_adapters(server):
    base, setup = server
    cards = {c["id"]: c for c in httpx.get(base + "/v1/models").json()["data"]}
    assert set(cards) == {MODEL, "attn", "mlp"}
    assert cards["attn"]["parent"] == MODEL and cards["attn"]["root"] == str(setup["attn"])
    assert httpx.get(base + "/v1/models/mlp").status_code == 200


def test_unknown_adapter_is_a_400_naming_the_field(server):
    base, _ = server
    r = generate(base, input_ids=PROMPTS[0], lora_path="nope")
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
    assert "nope" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/completions", json={"model": f"{MODEL}:nope", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    r = httpx.post(base + "/v1/chat/completions", json={"model": f"{MODEL}:nope", "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    assert generate(base, input_ids=PROMPTS[0], lora_path="attn").status_code == 200


def test_load_and_unload_over_http_while_a_request_runs(server, tmp_path):
    base, setup = server
    long_new = 64
    long_want = reference_greedy(setup["base"], setup["mlp"], PROMPTS[:1], long_new)[0]
    result = {}
    running = threading.Thread(target=lambda: result.update(generate(
        base, input_ids=PROMPTS[0], lora_path="mlp", sampling_params={**GREEDY, "max_new_tokens": long_new}).json()))
    running.start()

    def load(name, path):
        return httpx.post(base + "/load_lora_adapter", headers=ADMIN, timeout=60,
                          json={"lora_name": name, "lora_path": str(path)})

    assert httpx.post(base + "/load_lora_adapter", json={"lora_name": "x", "lora_path": "y"}).status_code == 401
    r = load("missing", tmp_path / "nowhere")
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    assert "'missing'" in r.json()["error"]["message"] and "adapter_config.json" in r.json()["error"]["message"]
    big = make_adapter(setup["base"], tmp_path / "big", 16, ["q_proj"], seed=5)
    r = load("big", big)
    assert r.status_code == 400 and "rank 16 is larger than max_lora_rank (8)" in r.json()["error"]["message"]
    r = httpx.post(base + "/load_lora_adapter", headers=ADMIN, json={"lora_path": str(big)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"

    r = load("all", setup["all"])
    assert r.status_code == 200 and set(r.json()["loaded_adapters"]) == {"attn", "mlp", "all"}, r.text
    out = generate(base, input_ids=PROMPTS[1], lora_path="all").json()
    assert out["output_ids"] == reference_greedy(setup["base"], setup["all"], PROMPTS[1:], NEW_TOKENS)[0]
    r = httpx.post(base + "/unload_lora_adapter", headers=ADMIN, json={"lora_name": "all"})
    assert r.status_code == 200 and set(r.json()["loaded_adapters"]) == {"attn", "mlp"}
    r = generate(base, input_ids=PROMPTS[1], lora_path="all")
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    r = httpx.post(base + "/unload_lora_adapter", headers=ADMIN, json={"lora_name": "all"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"

    running.join(120)
    assert result["output_ids"] == long_want  # undisturbed by everything above
