"""Fuzz every endpoint the server's OpenAPI schema lists with hostile bodies of
the real request shapes (tests/fuzz_bodies.py): never a 5xx, admin endpoints
refuse the user's key, the scheduler never dies, and afterwards a valid request
still works and no KV is in use. bench/fuzz_http.py is the long version."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from typing import FrozenSet, List, Tuple

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.fuzz_bodies import fuzz_cases
from tests.server_utils import start_server

API_KEY = "fuzz-user"
ADMIN_KEY = "fuzz-admin"
USER = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class FuzzTarget:
    proc: subprocess.Popen
    base: str
    routes: List[Tuple[str, str]]  # (path, method) from the server's OpenAPI schema
    admin_paths: FrozenSet[str]  # the paths that refuse the user's key

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis prints it with every failing example
        printer.text(f"FuzzTarget({self.base})")


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("fuzz") / "server.log", "w")
    proc, base = start_server(tiny_model_factory("llama"), "--api-key", API_KEY, "--admin-api-key", ADMIN_KEY,
                              "--log-level", "warning", "--context-length", "64", log=log)
    spec = httpx.get(f"{base}/openapi.json", headers=USER).json()
    routes = [(path, method.upper()) for path, ops in spec["paths"].items() for method in ops]
    admin_paths = frozenset(p for p, _ in routes if httpx.post(f"{base}{p}", headers=USER).status_code == 401)
    yield FuzzTarget(proc, base, routes, admin_paths)
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


# No shrinking: each step of it is a round trip to a live server; the failing
# body is printed whole in the assertion message instead.
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(data=st.data())
def fuzz_once(server: FuzzTarget, data):
    case = data.draw(fuzz_cases(server.routes, server.admin_paths))
    headers = {"content-type": "application/json",
               "Authorization": f"Bearer {ADMIN_KEY if case.admin else API_KEY}"}
    try:
        r = httpx.request(case.method, f"{server.base}{case.path}", content=case.content(), headers=headers,
                          timeout=60)
    except httpx.HTTPError as e:
        alive = server.proc.poll() is None
        raise AssertionError(f"{type(e).__name__} ({'server alive' if alive else 'SERVER DIED'}): "
                             f"{case.describe()}") from e
    assert r.status_code < 500, (r.status_code, r.text[:300], case.describe())
    if case.path in server.admin_paths and not case.admin:
        assert r.status_code == 401, (r.status_code, case.describe())


def test_fuzz_all_endpoints(server):
    proc, base = server.proc, server.base
    assert {"/v1/completions", "/v1/chat/completions", "/generate", "/flush_cache"} <= {p for p, _ in server.routes}
    assert {"/flush_cache", "/abort_request", "/get_weights_by_name"} <= server.admin_paths
    fuzz_once(server)
    assert proc.poll() is None and httpx.get(f"{base}/health").status_code == 200
    ok = httpx.post(f"{base}/generate", headers=USER, json={"input_ids": [5, 6, 7], "sampling_params": {
        "max_new_tokens": 3, "temperature": 0, "ignore_eos": True}})
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 3
    kv = httpx.get(f"{base}/get_server_info", headers=USER).json()["kv_cache"]
    for _ in range(100):  # aborts of timed-out requests land asynchronously; bounded, not timed
        if kv["in_use_tokens"] == 0:
            break
        time.sleep(0.1)
        kv = httpx.get(f"{base}/get_server_info", headers=USER).json()["kv_cache"]
    assert kv["in_use_tokens"] == 0, kv
    assert kv["total_tokens"] == kv["free_tokens"] + kv["in_use_tokens"] + kv["cached_tokens"], kv


def test_framework_answers_in_our_error_format(server):
    """FastAPI's own 404 and 405, and /metrics on a server started without
    --enable-metrics, answer the OpenAI error body like every other refusal."""
    base = server.base
    for method, path, status in (("GET", "/no/such/route", 404), ("POST", "/v1/nope", 404),
                                 ("DELETE", "/v1/models", 405), ("GET", "/generate", 405)):
        r = httpx.request(method, f"{base}{path}", headers=USER)
        assert r.status_code == status and r.json()["error"]["code"] == status, (method, path, r.text)
        assert path in r.json()["error"]["message"]
    metrics = httpx.get(f"{base}/metrics", headers=USER)
    assert metrics.status_code == 404 and "--enable-metrics" in metrics.json()["error"]["message"]


def test_every_route_has_its_own_operation_id(server):
    """OpenAPI clients name a method per operation id: a route that takes GET
    and POST must not give both the same one (/flush_cache, /get_weights_by_name)."""
    spec = httpx.get(f"{server.base}/openapi.json", headers=USER).json()
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    for path in ("/flush_cache", "/get_weights_by_name"):
        assert set(spec["paths"][path]) == {"get", "post"}
