"""Two tiny-model workers behind SGLang's gateway (sglang-router, cache_aware),
started by radixserve.launch_cluster: the same answers as a worker asked
directly, prefix affinity, and a worker killed mid-run."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from radixserve.entrypoints.launch_cluster import Cluster, Member
from tests.gateway_utils import post, start_cluster, streamed
from tests.server_utils import MODEL, whole_pages

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sglang_router") is None, reason="sglang-router is not installed (pip install 'radixserve[router]')")

GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def cluster(tiny_model_factory, tmp_path_factory):
    handle = start_cluster(tiny_model_factory("llama"), tmp_path_factory.mktemp("cluster"),
                           "--served-model-name", MODEL)
    yield handle
    handle.stop()


def completion_text(chunks: list) -> str:
    return "".join(c["choices"][0]["text"] for c in chunks)


def chat_text(chunks: list) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def test_gateway_answers_as_a_worker_does(cluster):
    worker = cluster.worker_urls[0]
    gen = {"text": "The river runs", "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
    assert post(cluster.url, "/generate", gen)["output_ids"] == post(worker, "/generate", gen)["output_ids"]
    assert streamed(cluster.url, "/generate", gen)[-1]["text"] == streamed(worker, "/generate", gen)[-1]["text"]
    comp = {"model": MODEL, "prompt": "Once there was", **GREEDY}
    direct = post(worker, "/v1/completions", comp)["choices"][0]["text"]
    assert post(cluster.url, "/v1/completions", comp)["choices"][0]["text"] == direct
    assert completion_text(streamed(cluster.url, "/v1/completions", comp)) == direct
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Say something"}], **GREEDY}
    direct = post(worker, "/v1/chat/completions", chat)["choices"][0]["message"]["content"]
    assert post(cluster.url, "/v1/chat/completions", chat)["choices"][0]["message"]["content"] == direct
    assert chat_text(streamed(cluster.url, "/v1/chat/completions", chat)) == direct


def cached_in_tree(worker: str) -> int:
    return httpx.get(f"{worker}/get_server_info").json()["kv_cache"]["cached_tokens"]


def test_shared_prefix_lands_on_one_worker(cluster):
    for worker in cluster.worker_urls:
        assert httpx.post(f"{worker}/flush_cache").status_code == 200
    prefix = "Here is a long shared system prompt about rivers, mountains and the sea. " * 6
    prefix_tokens = len(httpx.post(f"{cluster.worker_urls[0]}/tokenize", json={"prompt": prefix}).json()["tokens"])
    outs = [post(cluster.url, "/generate", {"text": f"{prefix} Question {i}:",
                                            "sampling_params": {"temperature": 0, "max_new_tokens": 2}})
            for i in range(6)]
    # Every request after the first found the prefix in its worker's cache...
    matchable = whole_pages(cluster.worker_urls[0], prefix_tokens - 1)
    assert matchable > 0
    assert all(o["meta_info"]["cached_tokens"] >= matchable for o in outs[1:])
    # ... and only one worker holds it.
    trees = sorted(cached_in_tree(w) for w in cluster.worker_urls)
    assert trees[0] == 0 and trees[1] >= prefix_tokens, trees


def test_a_killed_worker_is_reported_and_the_other_serves(cluster):
    victim = "worker 1"
    os.kill(cluster.pids[victim], signal.SIGKILL)
    deadline = time.time() + 60
    while f"{victim} ({cluster.workers[victim]}" not in cluster.output():
        assert time.time() < deadline, cluster.output()
        time.sleep(0.2)
    assert "exited with code -9" in cluster.output() and cluster.proc.poll() is None

    def ask(i: int) -> int:
        body = {"text": f"after the failure {i}", "sampling_params": {"max_new_tokens": 2}}
        return httpx.post(f"{cluster.url}/generate", json=body, timeout=120).status_code

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(ask, range(12)))
    assert codes == [200] * 12
    assert cluster.stop() == 0 and "all stopped" in cluster.output()
    survivor = cluster.workers["worker 0"]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{survivor}/health", timeout=2)


def test_exit_on_worker_death_stops_all(capsys):
    def member(name: str, code: str) -> Member:
        return Member(name, f"http://127.0.0.1/{name}", subprocess.Popen([sys.executable, "-c", code]))

    cluster = Cluster([member("worker 0", "import time; time.sleep(60)"), member("worker 1", "raise SystemExit(3)")],
                      exit_on_worker_death=True, out=sys.stdout)
    cluster.workers[1].proc.wait(timeout=30)
    assert cluster.check() == 1
    cluster.stop()
    out = capsys.readouterr().out
    assert "worker 1 (http://127.0.0.1/worker 1, pid" in out and "exited with code 3" in out
    assert cluster.workers[0].proc.returncode == -signal.SIGTERM
