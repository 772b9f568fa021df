"""Fuzz every endpoint the server's OpenAPI schema lists with generated bodies:
never a 5xx, admin endpoints always refuse without the admin key, and the
server still answers a valid request afterwards."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_utils import start_server

# Field names the endpoints know, so generated bodies reach deep validation
# paths, not only the "unknown field" ones.
FIELDS = ["model", "prompt", "messages", "text", "input_ids", "sampling_params", "max_tokens", "temperature",
          "top_p", "top_k", "n", "stop", "seed", "stream", "logprobs", "top_logprobs", "echo", "logit_bias",
          "max_new_tokens", "min_p", "role", "content", "rid", "tokens", "return_logprob", "top_logprobs_num",
          "logprob_start_len", "stream_options", "include_usage", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "stop_token_ids", "ignore_eos", "chat_template_kwargs", "abort_all",
          "max_completion_tokens", "min_tokens", "n", "user", "type"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["tiny", "user", "assistant", "system", "", "text"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=5),
    ),
    max_leaves=20,
)
bodies = st.one_of(st.dictionaries(st.sampled_from(FIELDS), values, max_size=8), values)

ADMIN = {"/flush_cache", "/abort_request"}
ADMIN_KEY = "fuzz-admin"


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("fuzz") / "server.log", "w")
    proc, base = start_server(tiny_model_factory("llama"), "--admin-api-key", ADMIN_KEY, "--log-level", "warning",
                              "--context-length", "64", log=log)
    spec = httpx.get(f"{base}/openapi.json").json()
    routes = [(path, method.upper()) for path, ops in spec["paths"].items() for method in ops]
    yield base, routes
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def concrete(path: str) -> str:
    return path.replace("{model_id}", "tiny")


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def fuzz_once(server, data):
    base, routes = server
    path, method = data.draw(st.sampled_from(routes))
    body = data.draw(bodies)
    raw = json.dumps(body, allow_nan=True).encode()
    if data.draw(st.booleans()) and raw:
        cut = data.draw(st.integers(0, len(raw)))
        raw = raw[:cut]  # malformed JSON too
    r = httpx.request(method, f"{base}{concrete(path)}", content=raw, timeout=60,
                      headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, raw, r.status_code, r.text[:300])
    if path in ADMIN:
        assert r.status_code == 401, (path, r.status_code)


def test_fuzz_all_endpoints(server):
    base, routes = server
    assert {"/v1/completions", "/v1/chat/completions", "/generate", "/flush_cache"} <= {p for p, _ in routes}
    start = time.time()
    fuzz_once(server)
    assert time.time() - start < 120
    ok = httpx.post(f"{base}/generate", json={"input_ids": [5, 6, 7], "sampling_params": {
        "max_new_tokens": 3, "temperature": 0}})
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 3
    kv = httpx.get(f"{base}/get_server_info").json()["kv_cache"]
    assert kv["in_use_tokens"] == 0
