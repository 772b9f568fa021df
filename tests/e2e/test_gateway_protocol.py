"""The worker side of SGLang's gateway protocol on one tiny-model server:
/generate with SGLang's GenerateReqInput fields, /get_load, /model_info and
/server_info, stop_regex and max_new_tokens 0."""

from __future__ import annotations

import ast
import importlib.util
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from radixserve.managers.native_fields import DEFAULT_ONLY, known_fields
from tests.server_utils import MODEL, running_server

GREEDY = {"temperature": 0, "ignore_eos": True}
# What sglang-router 0.3.2 adds to every /generate it forwards (logged from a real gateway).
GATEWAY_ADDS = {"model": None, "return_text_in_logprobs": False, "stream": False, "log_metrics": True,
                "return_hidden_states": False, "background": False, "no_logs": False, "return_bytes": False,
                "return_entropy": False}


@pytest.fixture(scope="module")
def server(tiny_model_factory):
    with running_server(tiny_model_factory("llama")) as (_, base):
        yield base


@pytest.fixture(scope="module")
def tokenizer(tiny_model_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_factory("llama"))


def generate(server: str, **body) -> httpx.Response:
    return httpx.post(f"{server}/generate", json=body, timeout=120)


def sglang_generate_fields() -> dict:
    """GenerateReqInput's fields and default expressions in the installed sglang,
    read from its source (importing sglang.srt needs torchvision and more)."""
    spec = importlib.util.find_spec("sglang")
    # make setup installs it (test-only, --no-deps); without it this check cannot run.
    assert spec is not None, "sglang is not installed: run make setup (see docs/gateway.md)"
    source = Path(spec.origin).parent / "srt" / "managers" / "io_struct.py"
    tree = ast.parse(source.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GenerateReqInput")
    return {st.target.id: st.value for st in cls.body if isinstance(st, ast.AnnAssign)}


def default_of(expr) -> object:
    """`x = 3` or `x = field(default=3, ...)` -> 3."""
    if isinstance(expr, ast.Call):
        expr = next(k.value for k in expr.keywords if k.arg == "default")
    return ast.literal_eval(expr) if expr is not None else None


def test_generate_knows_every_sglang_field():
    fields = sglang_generate_fields()
    assert set(fields) == set(known_fields())
    for name, default in DEFAULT_ONLY.items():
        assert default_of(fields[name]) == default, name


def test_gateway_body_gives_the_plain_answer(server):
    params = {**GREEDY, "max_new_tokens": 6}
    plain = generate(server, text="The weather today", sampling_params=params).json()
    forwarded = generate(server, text="The weather today", sampling_params=params, **GATEWAY_ADDS,
                         routed_dp_rank=0, bootstrap_room=None, lora_path=None).json()
    assert forwarded["output_ids"] == plain["output_ids"] and len(plain["output_ids"]) == 6
    batch = generate(server, text=["a b", "c d"], sampling_params=params, return_hidden_states=[False, False])
    assert batch.status_code == 200 and len(batch.json()) == 2


@pytest.mark.parametrize("field, value", [
    ("return_hidden_states", True), ("lora_path", "adapter"), ("background", True), ("image_data", "x.png"),
    ("return_hidden_states", [False, True]), ("routed_dp_rank", 1), ("data_parallel_rank", -1),
    ("not_a_field", 1),
])
def test_unsupported_values_are_400_naming_the_field(server, field, value):
    r = generate(server, text="hi", sampling_params={"max_new_tokens": 1}, **{field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_model_info_and_server_info(server, tokenizer):
    info = httpx.get(f"{server}/model_info").json()
    assert info == httpx.get(f"{server}/get_model_info").json()
    assert info["served_model_name"] == MODEL and info["is_generation"] is True
    assert info["model_type"] == "llama" and info["architectures"] == ["LlamaForCausalLM"]
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(info["tokenizer_path"])  # a local folder a client can load
    ours = httpx.post(f"{server}/tokenize", json={"prompt": "a gateway test"}).json()["tokens"]
    assert theirs.encode("a gateway test") == ours == tokenizer.encode("a gateway test")
    server_info = httpx.get(f"{server}/server_info").json()
    assert server_info.keys() == httpx.get(f"{server}/get_server_info").json().keys()
    assert server_info["tp_size"] == 1 and server_info["dp_size"] == 1
    assert server_info["disaggregation_mode"] == "null" and server_info["tokenizer_path"] == info["tokenizer_path"]
    assert server_info["max_total_num_tokens"] > 0 and len(server_info["internal_states"]) == 1
    assert "api_key" not in server_info


def test_get_load_follows_the_scheduler(server):
    def load() -> dict:
        records = httpx.get(f"{server}/get_load").json()
        assert [r["dp_rank"] for r in records] == [0]
        return records[0]

    def long_request() -> None:
        generate(server, text="keep going", rid="load-probe", sampling_params={**GREEDY, "max_new_tokens": 400})

    worker = threading.Thread(target=long_request)
    worker.start()
    deadline = time.time() + 60
    while (busy := load())["num_reqs"] == 0:  # bounded: only guards against a hang
        assert time.time() < deadline and worker.is_alive()
        time.sleep(0.05)
    kv = httpx.get(f"{server}/get_server_info").json()["kv_cache"]
    assert busy["num_reqs"] == 1 and busy["num_waiting_reqs"] in (0, 1)
    assert 0 <= busy["num_tokens"] <= kv["total_tokens"]
    httpx.post(f"{server}/abort_request", json={"rid": "load-probe"})  # no need to wait for 400 tokens
    worker.join(timeout=180)
    assert load() == {"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}


def first_match_len(tokenizer, ids, pattern: str) -> int:
    """The fewest leading tokens whose text matches: where generation must stop."""
    return next(k for k in range(1, len(ids) + 1) if re.search(pattern, tokenizer.decode(ids[:k])))


def test_stop_regex_stops_where_the_text_first_matches(server, tokenizer):
    full = generate(server, text="Once upon a time", sampling_params={**GREEDY, "max_new_tokens": 40}).json()
    ids = full["output_ids"]
    # A pattern the reference output matches after a few tokens: the first
    # capitalised word after the 3rd token, or any word of 5+ letters.
    third_on = tokenizer.decode(ids[3:])
    word = re.search(r"[A-Za-z]{4,}", third_on).group(0)
    for pattern in (re.escape(word), r"[A-Za-z]{5,}\b", [r"\d{3}", re.escape(word)]):
        patterns = [pattern] if isinstance(pattern, str) else pattern
        want = min(first_match_len(tokenizer, ids, p) for p in patterns if re.search(p, tokenizer.decode(ids)))
        assert want < len(ids)  # it stops early
        out = generate(server, text="Once upon a time",
                       sampling_params={**GREEDY, "max_new_tokens": 40, "stop_regex": pattern}).json()
        assert out["output_ids"] == ids[:want], pattern
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
        assert out["meta_info"]["finish_reason"]["matched"] in patterns
        assert out["text"] == tokenizer.decode(ids[:want])  # the matched text stays, as in SGLang
    never = generate(server, text="Once upon a time",
                     sampling_params={**GREEDY, "max_new_tokens": 40, "stop_regex": r"\d{7}"}).json()
    assert never["output_ids"] == ids and never["meta_info"]["finish_reason"]["type"] == "length"


@pytest.mark.parametrize("value", ["(", "", ["ok", 3], ["a"] * 33, "x" * 300])
def test_bad_stop_regex_is_400(server, value):
    r = generate(server, text="hi", sampling_params={"max_new_tokens": 1, "stop_regex": value})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_regex", r.text


def test_max_new_tokens_zero_scores_the_prompt_only(server):
    body = dict(text="The quick brown fox jumps", return_logprob=True, logprob_start_len=0)
    zero = generate(server, sampling_params={"max_new_tokens": 0}, **body).json()
    one = generate(server, sampling_params={"max_new_tokens": 1, "temperature": 0}, **body).json()
    assert zero["output_ids"] == [] and zero["text"] == ""
    assert zero["meta_info"]["completion_tokens"] == 0
    assert zero["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert zero["meta_info"]["output_token_logprobs"] == []
    prompt_lp = zero["meta_info"]["input_token_logprobs"]
    assert len(prompt_lp) == zero["meta_info"]["prompt_tokens"]
    assert [t for _, t, _ in prompt_lp] == [t for _, t, _ in one["meta_info"]["input_token_logprobs"]]
    assert [lp for lp, _, _ in prompt_lp[1:]] == pytest.approx(
        [lp for lp, _, _ in one["meta_info"]["input_token_logprobs"][1:]], abs=1e-5)
    kv = httpx.get(f"{server}/get_server_info").json()["kv_cache"]
    assert kv["in_use_tokens"] == 0
    assert kv["total_tokens"] == kv["free_tokens"] + kv["in_use_tokens"] + kv["cached_tokens"]
