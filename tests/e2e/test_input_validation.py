"""Issue 15's bad bodies against one real server: each is a 400 naming its
field (or a bounded answer), nothing reaches the scheduler, and the server
keeps serving with no KV left in use."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from starlette.testclient import TestClient

from tests.server_utils import MODEL, running_server

SURROGATE = "\\ud800"  # JSON text of a lone surrogate; json.dumps would escape the backslash


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("input_validation") / "server.log"
    with open(log_path, "w") as log, running_server(tiny_model_factory("llama"), log=log) as (_, base):
        with httpx.Client(base_url=base, timeout=60) as client:
            yield client


def kv_settled(client: httpx.Client) -> dict:
    """The KV counters once no request holds KV (polled: aborts land asynchronously)."""
    for _ in range(200):
        kv = client.get("/get_server_info").json()["kv_cache"]
        if kv["in_use_tokens"] == 0:
            return kv
        time.sleep(0.05)
    return kv


def raw(text: str) -> bytes:
    return text.encode()


CHAT = {"model": MODEL, "max_tokens": 1}
OUR_NAMES = ("max_new_tokens", "min_new_tokens", "sampling_seed", "top_logprobs_num")
BAD = [
    # (path, body (dict or raw JSON bytes), the field the 400 names)
    ("/generate", {"text": "hello there my friend", "return_logprob": True, "logprob_start_len": 0,
                   "top_logprobs_num": 100000}, "top_logprobs_num"),
    ("/v1/completions", {"prompt": "hello", "echo": True, "logprobs": 100000, "max_tokens": 1}, "logprobs"),
    ("/v1/completions", {"prompt": "hello", "logprobs": 6, "max_tokens": 1}, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/generate", {"text": "hi", "sampling_params": {"top_k": 9223372036854775808, "max_new_tokens": 1}}, "top_k"),
    ("/generate", {"text": "hi", "sampling_params": {"top_k": 49153}}, "top_k"),
    ("/generate", {"text": "hi", "sampling_params": {"sampling_seed": 2**64}}, "sampling_seed"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2**63}}, "max_new_tokens"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2**63}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 2**63}, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "min_tokens": 5}, "min_tokens"),
    ("/v1/completions", {"prompt": [[1, 2], [49152]]}, "prompt"),
    ("/generate", {"input_ids": 1}, "input_ids"),
    ("/generate", {"input_ids": {"a": 1}}, "input_ids"),
    ("/generate", {"input_ids": True}, "input_ids"),
    ("/generate", {"text": "hi", "sampling_params": {"n": 0}}, "n"),
    ("/generate", {"text": "hi", "sampling_params": {"n": "2"}}, "n"),
    ("/generate", {"text": "hi", "sampling_params": {"n": 65}}, "n"),
    ("/generate", {"text": "hi", "sampling_params": {"sampling_seed": "a"}}, "sampling_seed"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": "2"}, "n"),
    ("/generate", {"text": ["a", "b"], "return_logprob": True, "logprob_start_len": [0, "a"]}, "logprob_start_len"),
    ("/generate", {"text": ["a", "b"], "top_logprobs_num": [1, 100000]}, "top_logprobs_num"),
    ("/generate", {"text": "hi", "return_logprob": True, "logprob_start_len": 100}, "logprob_start_len"),
    ("/generate", {"text": "hi", "stream": -1e308}, "stream"),
    ("/v1/completions", {"prompt": "hi", "stream": -1e308}, "stream"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi"}], "stream": 1}, "stream"),
    ("/generate", raw('{"text": "' + SURROGATE + '"}'), "text"),
    ("/v1/completions", raw('{"prompt": "a' + SURROGATE + '"}'), "prompt"),
    ("/v1/chat/completions", raw('{"messages": [{"role": "user", "content": "' + SURROGATE + '"}]}'),
     "messages[0].content"),
    ("/tokenize", raw('{"prompt": "' + SURROGATE + '"}'), "prompt"),
    ("/generate", raw("[" * 1000 + "]" * 1000), None),
    ("/v1/completions", raw('{"prompt": ' + "[" * 100 + "]" * 100 + "}"), "prompt"),
    ("/generate", raw('{"text": "hi", "sampling_params": {"temperature": NaN}}'), None),
    ("/generate", {"text": ["a", "b"], "rid": ["same", "same"]}, "rid"),
    ("/generate", {"text": "hi", "sampling_params": {"regex": "a(b"}}, "regex"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ("/get_weights_by_name", {"name": "model.embed_tokens.weight", "truncate_size": None}, "truncate_size"),
    ("/get_weights_by_name", raw('{"name": "model.embed_tokens.weight", "truncate_size": 1e999}'), "truncate_size"),
    ("/get_weights_by_name", {"name": "model.embed_tokens.weight", "truncate_size": -1}, "truncate_size"),
    ("/get_weights_by_name", {"name": "model.embed_tokens.weight", "truncate_size": 10**12}, "truncate_size"),
]


def test_bad_bodies_are_400s_naming_the_field(server):
    failures = []
    for path, body, field in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = server.post(path, content=content, headers={"content-type": "application/json"})
        error = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 400 or (field is not None and error.get("param") != field):
            failures.append((path, content[:120], r.status_code, r.text[:300]))
        elif ".cc" in error["message"] or "/project/" in error["message"]:
            failures.append((path, "C++ source path in the message", error["message"]))
        elif path.startswith("/v1") and any(ours in error["message"] for ours in OUR_NAMES):
            failures.append((path, "our name, not the OpenAI field's, in the message", error["message"]))
    assert not failures, "\n".join(map(str, failures))
    assert server.post("/generate", json={"text": "still serving", "sampling_params": {"max_new_tokens": 2}}).json()[
        "meta_info"]["completion_tokens"] == 2
    kv = kv_settled(server)
    assert kv["in_use_tokens"] == 0 and kv["total_tokens"] == kv["free_tokens"] + kv["cached_tokens"], kv


def test_bounded_answers(server):
    """Values at the caps are served, and the reply stays as small as they say."""
    r = server.post("/v1/completions", json={"model": MODEL, "prompt": "The cat sat", "echo": True, "logprobs": 5,
                                             "max_tokens": 2})
    assert r.status_code == 200, r.text
    tops = r.json()["choices"][0]["logprobs"]["top_logprobs"]
    assert all(top is None or len(top) <= 5 for top in tops) and len(tops) >= 4
    r = server.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "hi"}],
                                                  "logprobs": True, "top_logprobs": 20})
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20
    r = server.post("/generate", json={"text": "hi", "return_logprob": True, "logprob_start_len": 0,
                                       "top_logprobs_num": 49152, "sampling_params": {"max_new_tokens": 1,
                                                                                      "top_k": 49152}})
    assert r.status_code == 200 and len(r.json()["meta_info"]["output_top_logprobs"][0]) == 49152
    r = server.post("/get_weights_by_name", json={"name": "model.embed_tokens.weight", "truncate_size": 10_000})
    assert r.status_code == 200 and len(r.json()) == 10_000
    r = server.get("/get_weights_by_name", params={"name": "model.embed_tokens.weight", "truncate_size": "3"})
    assert r.status_code == 200 and len(r.json()) == 3
    assert kv_settled(server)["in_use_tokens"] == 0


def test_one_rid_for_a_batch_gives_each_prompt_its_own(server):
    """The issue's hang: both prompts got rid "dup1" and one never finished.
    Now they are dup1_0 and dup1_1 (as in SGLang), and the rid is free again after."""
    for _ in range(2):
        r = server.post("/v1/completions", json={"model": MODEL, "prompt": [[1, 2], [3]], "max_tokens": 2,
                                                 "rid": "dup1"})
        assert r.status_code == 200, r.text
        assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    out = server.post("/generate", json={"input_ids": [[1, 2], [3]], "rid": "dup2",
                                         "sampling_params": {"max_new_tokens": 1}}).json()
    assert [o["meta_info"]["id"] for o in out] == ["dup2_0", "dup2_1"]


def test_rid_in_flight_is_refused_and_then_free(server):
    """While a request is in flight (held there by pause_generation) its rid is
    refused; the refusal leaves nothing behind, and the rid is free once it ends."""
    body = {"text": "once upon a time", "rid": "busy", "sampling_params": {"max_new_tokens": 2}}
    first: dict = {}
    assert server.post("/pause_generation", json={}).status_code == 200
    worker = threading.Thread(target=lambda: first.update(r=server.post("/generate", json=body)))
    worker.start()
    try:
        for _ in range(400):  # until the first one waits in the scheduler's queue
            if server.get("/get_server_info").json()["num_waiting_reqs"] == 1:
                break
            time.sleep(0.05)
        again = server.post("/generate", json=body)
        assert again.status_code == 400 and again.json()["error"]["param"] == "rid", again.text
        assert "already in flight" in again.json()["error"]["message"]
    finally:
        server.post("/continue_generation", json={})
        worker.join(timeout=60)
    assert first["r"].status_code == 200, first["r"].text
    assert server.post("/generate", json=body).status_code == 200
    assert kv_settled(server)["in_use_tokens"] == 0


def test_unexpected_error_is_a_json_500(tiny_model_factory):
    """The last-resort handler: a route that fails in an unforeseen way answers
    a JSON 500 in the error format (here the TokenizerManager is a stand-in
    whose server-info call breaks: no scheduler is involved)."""
    from types import SimpleNamespace

    from radixserve.entrypoints.http_server import ServerState, create_app
    from radixserve.server_args import ServerArgs

    async def broken_info():
        raise KeyError("boom")

    tm = SimpleNamespace(metrics=None, tokenizer=None, is_dead=False, dead_reason=None, get_server_info=broken_info)
    args = ServerArgs(model_path=str(tiny_model_factory("llama")))
    app = create_app(ServerState(tm=tm, server_args=args, served_model_name=MODEL))
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/get_server_info")
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "KeyError" in r.json()["error"]["message"]
