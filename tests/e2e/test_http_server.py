"""The HTTP server through a real server process, with the official openai client."""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.server_utils import MODEL, descendants_of, processes_left, running_server, start_server

@pytest.fixture(scope="module")
def server(tiny_model_factory):
    with running_server(tiny_model_factory("llama"), "--constrained-json-disable-any-whitespace") as (_, base):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completions_prompt_forms(client):
    one = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, temperature=0)
    assert len(one.choices) == 1 and one.usage.completion_tokens == 5
    many = client.completions.create(model=MODEL, prompt=["Hello there", "Good morning"], max_tokens=5,
                                     temperature=0)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == one.choices[0].text
    ids = client.completions.create(model=MODEL, prompt=[15, 400, 2311], max_tokens=4, temperature=0)
    assert ids.usage.prompt_tokens == 3
    batch_ids = client.completions.create(model=MODEL, prompt=[[15, 400], [7, 8, 9]], max_tokens=4,
                                          temperature=0)
    assert batch_ids.usage.prompt_tokens == 5 and len(batch_ids.choices) == 2


def test_completions_n_echo_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, n=2, seed=3,
                                    temperature=1.0, extra_body={"ignore_eos": True})
    assert len(out.choices) == 2 and out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens == len(client_tokenize(client, "Once upon"))
    echo = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("Once upon")
    lp = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.token_logprobs) == 3
    assert all(len(top) <= 2 for top in lp.choices[0].logprobs.top_logprobs)
    assert "".join(lp.choices[0].logprobs.tokens) == lp.choices[0].text


def client_tokenize(client, text: str) -> list:
    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    return httpx.post(f"{base}/tokenize", json={"prompt": text}).json()["tokens"]


def test_chat(client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    lp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                        logprobs=True, top_logprobs=2)
    assert len(lp.choices[0].logprobs.content) == lp.usage.completion_tokens


def test_chat_stream(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=10,
        temperature=0.8, n=2, seed=1, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == 0)
    again = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=10,
        temperature=0.8, n=2, seed=1)
    assert again.choices[0].message.content == text  # seeds reproduce, streamed or not


def test_stop_and_extra_body(client):
    full = client.completions.create(model=MODEL, prompt="The cat", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[4:7]
    cut = client.completions.create(model=MODEL, prompt="The cat", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    topk = client.completions.create(model=MODEL, prompt="The cat", max_tokens=12, temperature=1.0,
                                     extra_body={"top_k": 1, "ignore_eos": True, "min_p": 0.0})
    assert topk.choices[0].text == full


def test_bad_requests(client, server):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x " * 600)  # longer than the context
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": "hi"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2,
                                                     "some_future_field": 1})
    assert r.status_code == 200  # unknown fields are ignored


def test_native_generate(server):
    one = httpx.post(f"{server}/generate", json={"text": "Hello", "sampling_params": {
        "max_new_tokens": 4, "temperature": 0}}).json()
    assert one["meta_info"]["completion_tokens"] == 4
    batch = httpx.post(f"{server}/generate", json={"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": {
        "max_new_tokens": 3, "temperature": 0}}).json()
    assert [b["meta_info"]["prompt_tokens"] for b in batch] == [3, 2]
    lines = []
    with httpx.stream("POST", f"{server}/generate", json={"text": "Hello", "stream": True, "sampling_params": {
            "max_new_tokens": 4, "temperature": 0}}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][5:])["text"] == one["text"]
    bad = httpx.post(f"{server}/generate", json={"text": "", "sampling_params": {}})
    assert bad.status_code == 400


def test_tokenize_info_flush(server):
    ids = httpx.post(f"{server}/tokenize", json={"prompt": "round trip"}).json()["tokens"]
    assert httpx.post(f"{server}/detokenize", json={"tokens": ids}).json()["text"] == "round trip"
    info = httpx.get(f"{server}/get_server_info").json()
    assert {"max_total_num_tokens", "num_running_reqs", "kv_cache", "weight_version"} <= set(info)
    assert httpx.get(f"{server}/get_model_info").json()["served_model_name"] == MODEL
    assert httpx.post(f"{server}/flush_cache").json()["success"] is True
    assert httpx.get(f"{server}/health_generate").status_code == 200


def test_disconnect_aborts(server):
    def stream_and_maybe_leave(leave: bool):
        with httpx.stream("POST", f"{server}/v1/completions", timeout=120, json={
                "model": MODEL, "prompt": "Tell a story", "max_tokens": 400, "stream": True,
                "ignore_eos": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if leave and i >= 3:
                    return  # closes the connection mid-stream

    threads = [threading.Thread(target=stream_and_maybe_leave, args=(i % 2 == 0,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads[::2]:
        t.join(timeout=180)  # the leavers are gone
    # Their requests are aborted; only the 10 that stay can still run. (Bounded
    # polling only guards against a hang; tests/e2e/test_http_transport.py
    # holds requests paused to prove the abort itself.)
    deadline = time.time() + 60
    while (running := httpx.get(f"{server}/get_server_info").json()["num_running_reqs"]) > 10:
        assert time.time() < deadline, running
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=180)
    kv = httpx.get(f"{server}/get_server_info").json()["kv_cache"]
    assert kv["in_use_tokens"] == 0


def test_api_key_and_sigterm(tiny_model_factory):
    proc, base = start_server(tiny_model_factory("llama"), "--api-key", "sekret")
    try:
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong").models.list()
        kids = descendants_of(proc.pid)
        assert len(kids) >= 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    # Every process below the server goes away; how soon depends on the
    # machine, so the deadline only guards against a process left behind.
    assert processes_left(kids, deadline_s=30) == []


def test_structured_outputs_over_http(client, server):
    import jsonschema

    from tests.constrained.schemas import SCHEMAS

    schema = SCHEMAS[0]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Who?"}],
                                          max_tokens=80, temperature=1.0, seed=2, n=2, response_format=fmt)
    comp = client.completions.create(model=MODEL, prompt="Person:", max_tokens=80, temperature=0,
                                     extra_body={"response_format": fmt})
    native = httpx.post(f"{server}/generate", json={"text": "Person:", "sampling_params": {
        "json_schema": json.dumps(schema), "max_new_tokens": 80, "temperature": 0}}).json()
    for text in [c.message.content for c in chat.choices] + [comp.choices[0].text, native["text"]]:
        jsonschema.validate(json.loads(text), schema)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Date?"}],
                                            max_tokens=30, temperature=1.0, stream=True,
                                            extra_body={"regex": r"\d{4}-\d{2}-\d{2}"})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", text), text
    anything = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON"}],
                                              max_tokens=60, temperature=0, response_format={"type": "json_object"})
    assert anything.choices[0].finish_reason == "length" or json.loads(anything.choices[0].message.content) is not None
    with pytest.raises(openai.BadRequestError, match="regex"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True,
                                       extra_body={"regex": "(unclosed"})
    bad = httpx.post(f"{server}/generate", json={"text": "x", "stream": True, "sampling_params": {
        "json_schema": "{oops"}})
    assert bad.status_code == 400 and "json_schema" in bad.json()["error"]["message"]
