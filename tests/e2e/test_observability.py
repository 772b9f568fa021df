"""Metrics, logs, overload, request limits, admin key and scheduler faults, through a real server."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx
import pytest

from tests.server_utils import MODEL, running_server, start_server

LIMITS = ["--enable-metrics", "--log-requests", "--max-running-requests", "2", "--max-queued-requests", "2",
          "--max-total-tokens", "300", "--max-n", "4", "--max-batch-prompts", "3",
          "--max-request-body-bytes", "100000", "--admin-api-key", "adm"]


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / "server.log"
    with open(log_path, "w") as log_file:
        with running_server(tiny_model_factory("llama"), *LIMITS, log=log_file) as (_, base):
            yield base, log_path


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def generate(base, max_new_tokens=50, **extra):
    return httpx.post(f"{base}/generate", timeout=120, json={
        "input_ids": [11, 12, 13, 14], "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0,
                                                          "ignore_eos": True}, **extra})


def test_metrics_move_and_logs_appear(server):
    base, log_path = server
    before = httpx.get(f"{base}/metrics").text
    assert generate(base, rid="logged-req").status_code == 200
    after = httpx.get(f"{base}/metrics").text
    assert metric(after, "radixserve:generation_tokens_total") - metric(before, "radixserve:generation_tokens_total") == 50
    assert metric(after, "radixserve:prompt_tokens_total") - metric(before, "radixserve:prompt_tokens_total") == 4
    assert metric(after, "radixserve:requests_total", finish_reason="length") == \
        metric(before, "radixserve:requests_total", finish_reason="length") + 1
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "queue_time_seconds",
                 "inter_token_latency_seconds"):
        assert metric(after, f"radixserve:{hist}_count") > metric(before, f"radixserve:{hist}_count"), hist
    for gauge in ("num_running_reqs", "num_queue_reqs", "token_usage", "cache_hit_rate", "gen_throughput"):
        assert f"radixserve:{gauge}" in after
    time.sleep(0.5)
    log = log_path.read_text()
    assert re.search(r"Prefill batch\. #new-seq: \d+, #new-token: \d+, #cached-token: \d+, token usage: "
                     r"[\d.]+, #running-req: \d+, #queue-req: \d+", log)
    assert re.search(r"Decode batch\. #running-req: \d+, #token: \d+, token usage: [\d.]+, "
                     r"gen throughput \(token/s\): [\d.]+, #queue-req: \d+", log)
    assert "request logged-req: prompt_tokens=4 completion_tokens=50" in log
    assert "[11, 12" not in log  # no prompt content at the default level


def test_overload_gets_503_and_nothing_is_lost(server):
    base, _ = server
    results = []

    def run():
        results.append(generate(base, max_new_tokens=30))

    threads = [threading.Thread(target=run) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    codes = sorted(r.status_code for r in results)
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    for r in results:
        if r.status_code == 503:
            assert r.headers["retry-after"] and "overloaded" in r.json()["error"]["message"]
        else:
            assert r.json()["meta_info"]["completion_tokens"] == 30
    kv = httpx.get(f"{base}/get_server_info").json()["kv_cache"]
    assert kv["in_use_tokens"] == 0


def test_prompt_that_never_fits_is_400(server):
    base, _ = server
    r = httpx.post(f"{base}/generate", json={"input_ids": list(range(10, 410)),
                                             "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 400 and "never fit" in r.json()["error"]["message"]


def test_request_limits(server):
    base, _ = server
    r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi", "n": 5, "max_tokens": 1})
    assert r.status_code == 400 and "max_n" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": ["a", "b", "c", "d"], "max_tokens": 1})
    assert r.status_code == 400 and "max_batch_prompts" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x" * 200_000})
    assert r.status_code == 413 and "max-request-body-bytes" in r.json()["error"]["message"]
    assert generate(base, max_new_tokens=2).status_code == 200


def test_admin_key(server):
    base, _ = server
    assert httpx.post(f"{base}/flush_cache").status_code == 401
    assert httpx.post(f"{base}/abort_request", json={"abort_all": True}).status_code == 401
    ok = httpx.post(f"{base}/flush_cache", headers={"Authorization": "Bearer adm"})
    assert ok.status_code == 200 and ok.json()["success"] is True
    assert httpx.get(f"{base}/get_server_info").status_code == 200  # not an admin endpoint


def test_scheduler_death_fails_requests_and_exits(tiny_model_factory, tmp_path):
    with open(tmp_path / "log", "w") as log_file:
        proc, base = start_server(tiny_model_factory("llama"), log=log_file)
    outcome = {}

    def long_request():
        try:
            r = generate(base, max_new_tokens=500)
            outcome["status"] = r.status_code
        except httpx.HTTPError as e:
            outcome["status"] = type(e).__name__

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.3)
    scheduler = httpx.get(f"{base}/get_server_info").json()["tp_ranks"][0]["pid"]
    os.kill(scheduler, signal.SIGKILL)
    t.join(timeout=60)  # only a bound against a hang: the request must end, with an error
    assert not t.is_alive() and outcome["status"] != 200, outcome
    assert proc.wait(timeout=30) != 0

