"""Prefill/decode disaggregation behind SGLang's gateway in its
--pd-disaggregation mode, clusters started by radixserve.launch_cluster: one
prefill and one decode server of a tiny Llama, and of a tiny DeepSeek-V3 (MLA:
one latent buffer per layer; 4-token pages; the decode server keeping a radix
cache). The same answers as an ordinary server (the decode server itself,
asked without a bootstrap_room, takes the ordinary path), concurrency, client
disconnects, a decode-side cache hit moving only the rest and, last, a killed
prefill server.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from transformers import AutoTokenizer

from tests.gateway_utils import post, start_cluster, streamed
from tests.models.deepseek_tiny import build_deepseek
from tests.pd_utils import TIMEOUT_S, as_float32, kv_settled, pd_info
from tests.server_utils import MODEL

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sglang_router") is None or
                                importlib.util.find_spec("mooncake") is None,
                                reason="needs sglang-router and mooncake-transfer-engine (pip install 'radixserve[pd]')")


@pytest.fixture(scope="module")
def clusters(tiny_model_factory, embedded_tokenizer_dir, tmp_path_factory):
    """A Llama cluster and a DeepSeek-V3 one (4-token pages, the decode server
    keeping a radix cache), started together to share the start-up wait."""
    mla_path = tmp_path_factory.mktemp("deepseek_v3")
    build_deepseek("v3", len(AutoTokenizer.from_pretrained(embedded_tokenizer_dir)), mla_path, embedded_tokenizer_dir)
    common = ("--served-model-name", MODEL, "--disaggregation-transfer-timeout", str(TIMEOUT_S))
    with ThreadPoolExecutor(2) as pool:
        llama = pool.submit(start_cluster, tiny_model_factory("llama"), tmp_path_factory.mktemp("pd"), *common,
                            "--enable-metrics", pd=(1, 1))
        mla = pool.submit(start_cluster, mla_path, tmp_path_factory.mktemp("pd_mla"), *common, "--page-size", "4",
                          "--disaggregation-decode-enable-radix-cache", pd=(1, 1))
        handles = [f.result() for f in (llama, mla)]
    yield handles
    for handle in handles:
        handle.stop()


@pytest.fixture(scope="module")
def cluster(clusters):
    return clusters[0]


@pytest.fixture(scope="module")
def mla_cluster(clusters):
    return clusters[1]


def streamed_text(url: str, path: str, body: dict) -> str:
    chunks = streamed(url, path, body)
    if path == "/generate":
        return chunks[-1]["text"]
    if path == "/v1/completions":
        return "".join(c["choices"][0]["text"] for c in chunks)
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def test_answers_match_an_ordinary_server(cluster):
    ordinary = cluster.workers["decode 0"]  # without bootstrap fields: the ordinary path
    gen = {"text": "The river runs far", "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3,
           "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}}
    ours, ref = post(cluster.url, "/generate", gen), post(ordinary, "/generate", gen)
    assert ours["output_ids"] == ref["output_ids"] and ours["text"] == ref["text"]
    # (the gateway merges the prefill half's input_token_logprobs, not its input_top_logprobs)
    for key in ("input_token_logprobs", "output_token_logprobs", "output_top_logprobs"):
        assert as_float32(ours["meta_info"][key]) == as_float32(ref["meta_info"][key]), key
    assert streamed_text(cluster.url, "/generate", gen) == ref["text"]
    comp = {"model": MODEL, "prompt": "Once there was", "temperature": 0, "max_tokens": 8, "logprobs": 2}
    ref = post(ordinary, "/v1/completions", comp)["choices"][0]
    ours = post(cluster.url, "/v1/completions", comp)["choices"][0]
    assert ours["text"] == ref["text"] and as_float32(ours["logprobs"]) == as_float32(ref["logprobs"])
    assert streamed_text(cluster.url, "/v1/completions", comp) == ref["text"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Say something"}], "temperature": 0,
            "max_tokens": 8}
    ref = post(ordinary, "/v1/chat/completions", chat)["choices"][0]["message"]["content"]
    assert post(cluster.url, "/v1/chat/completions", chat)["choices"][0]["message"]["content"] == ref
    assert streamed_text(cluster.url, "/v1/chat/completions", chat) == ref


def test_32_concurrent_requests_of_mixed_lengths(cluster):
    ordinary = cluster.workers["decode 0"]
    bodies = [{"input_ids": [(7 * i + 13 * j) % 4000 + 10 for j in range(3 + 29 * i % 300)],
               "sampling_params": {"temperature": 0, "max_new_tokens": 4 + i % 9, "ignore_eos": True}}
              for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        ours = list(pool.map(lambda b: post(cluster.url, "/generate", b)["output_ids"], bodies))
        assert ours == list(pool.map(lambda b: post(ordinary, "/generate", b)["output_ids"], bodies))
    for name in ("prefill 0", "decode 0"):
        kv = kv_settled(cluster.workers[name])
        assert kv["in_use_tokens"] == 0 and kv["total_tokens"] == kv["free_tokens"] + kv["cached_tokens"], kv
    prefill, decode = pd_info(cluster.workers["prefill 0"]), pd_info(cluster.workers["decode 0"])
    assert prefill["num_transfers"] >= 32 and prefill["transfer_bytes"] == decode["transfer_bytes"]
    metrics = httpx.get(f"{cluster.workers['decode 0']}/metrics").text
    assert "radixserve:kv_transfer_latency_seconds_count" in metrics and "radixserve:kv_transfer_bytes" in metrics


def test_client_disconnect_frees_both_sides(cluster):
    body = {"text": "a long story", "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 5000, "ignore_eos": True}}
    with httpx.stream("POST", f"{cluster.url}/generate", json=body, timeout=60) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data:")
            if chunks == 3:
                break  # the client goes away mid-answer
    for name in ("prefill 0", "decode 0"):
        kv = kv_settled(cluster.workers[name])
        assert kv["in_use_tokens"] == 0 and kv["total_tokens"] == kv["free_tokens"] + kv["cached_tokens"], kv


def test_prefill_half_without_a_decode_side_fails_then_frees(cluster):
    """A prefill request whose decode server never asks: a clear error after the
    timeout; one whose client leaves while it waits: freed at once."""
    prefill = cluster.workers["prefill 0"]
    body = {"text": "nobody decodes this", "sampling_params": {"max_new_tokens": 4},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": 1, "bootstrap_room": 424242}
    r = httpx.post(f"{prefill}/generate", json=body, timeout=60)
    assert r.status_code == 500 and "no decode server asked for this request's KV" in r.text
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{prefill}/generate", json={**body, "bootstrap_room": 5}, timeout=1)
    kv = kv_settled(prefill)
    assert kv["in_use_tokens"] == 0 and kv["total_tokens"] == kv["free_tokens"] + kv["cached_tokens"], kv


def test_bad_or_unsupported_requests_are_refused(cluster):
    decode = cluster.workers["decode 0"]
    for extra, field in [({"bootstrap_room": -1, "bootstrap_host": "h", "bootstrap_port": 1}, "bootstrap_room"),
                         ({"bootstrap_room": 1, "bootstrap_port": 1}, "bootstrap_host"),
                         ({"bootstrap_room": 1, "bootstrap_host": "h", "bootstrap_port": 70000}, "bootstrap_port")]:
        r = httpx.post(f"{decode}/generate", json={"text": "x", **extra}, timeout=30)
        assert r.status_code == 400 and field in r.text, r.text
    # Not supported yet: refused alike by both halves, so neither waits for the other.
    pair = {"bootstrap_room": 9, "bootstrap_host": "127.0.0.1", "bootstrap_port": 1}
    for url in (decode, cluster.workers["prefill 0"]):
        r = httpx.post(f"{url}/generate", json={"text": "x", "sampling_params": {"regex": "a+"}, **pair}, timeout=30)
        assert r.status_code == 400 and "not supported with prefill/decode disaggregation" in r.text, r.text


# ---- DeepSeek-V3: the latent cache, 4-token pages, the decode side's radix cache ----

MLA_GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


def generate(url: str, ids: list) -> dict:
    body = {"input_ids": ids, "sampling_params": MLA_GREEDY, "return_logprob": True}
    r = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def flush_caches(cluster) -> None:
    for url in cluster.worker_urls:
        assert httpx.post(f"{url}/flush_cache", timeout=30).status_code == 200


def test_mla_latent_cache_is_transferred_exactly(mla_cluster):
    ordinary = mla_cluster.workers["decode 0"]  # without bootstrap fields: the ordinary path
    prompts = [[(11 * i + 5 * j) % 3000 + 20 for j in range(n)] for i, n in enumerate([3, 9, 17, 40])]
    for ids in prompts:
        # Each computed from scratch: a radix hit computes the rest on top of
        # the cached prefix, which may differ in the last bits.
        flush_caches(mla_cluster)
        ref = generate(ordinary, ids)
        flush_caches(mla_cluster)
        ours = generate(mla_cluster.url, ids)
        assert ours["output_ids"] == ref["output_ids"]
        assert as_float32(ours["meta_info"]["output_token_logprobs"]) == \
            as_float32(ref["meta_info"]["output_token_logprobs"])
    kv = kv_settled(ordinary)
    assert kv["in_use_tokens"] == 0 and kv["total_tokens"] == kv["free_tokens"] + kv["cached_tokens"], kv


def test_decode_radix_cache_moves_only_the_uncached_part(mla_cluster):
    decode = mla_cluster.workers["decode 0"]
    ids = [(7 * j) % 2500 + 30 for j in range(33)]
    before = pd_info(decode)["transfer_bytes"]
    first = generate(mla_cluster.url, ids)
    between = pd_info(decode)["transfer_bytes"]
    second = generate(mla_cluster.url, ids)
    after = pd_info(decode)["transfer_bytes"]
    assert second["output_ids"] == first["output_ids"]
    # 32 of the 33 prompt tokens (whole 4-token pages, one token left to move) were the decode side's own
    assert second["meta_info"]["cached_tokens"] == 32
    # (each transfer also carries the first token's record, the same size both times)
    assert after - between < (between - before) / 8, (before, between, after)
    kv = kv_settled(decode)
    assert kv["in_use_tokens"] == 0 and kv["cached_tokens"] > 0
    assert kv["total_tokens"] == kv["free_tokens"] + kv["cached_tokens"], kv


def test_killed_prefill_server_fails_waiting_requests_and_leaks_nothing(cluster):
    prefill_pid, decode = cluster.pids["prefill 0"], cluster.workers["decode 0"]
    os.kill(prefill_pid, signal.SIGSTOP)  # frozen: the decode side asks and waits

    def ask(i: int) -> int:
        body = {"text": f"frozen {i}", "sampling_params": {"max_new_tokens": 4}}
        return httpx.post(f"{cluster.url}/generate", json=body, timeout=120).status_code

    with ThreadPoolExecutor(4) as pool:
        codes = [pool.submit(ask, i) for i in range(4)]
        deadline = time.time() + 60
        while pd_info(decode)["num_waiting_for_kv"] < 4:
            assert time.time() < deadline, pd_info(decode)
            time.sleep(0.2)
        os.kill(prefill_pid, signal.SIGKILL)
        assert all(c.result() >= 500 for c in codes)
    log = (cluster.log.parent / "decode_0.log").read_text()
    assert "KV transfer timed out" in log and "waiting for the prefill server" in log
    kv = kv_settled(decode, wait_s=6 * TIMEOUT_S)  # the pages wait out the prefill side's last chance to write
    assert kv["in_use_tokens"] == 0 and kv["total_tokens"] == kv["free_tokens"] + kv["cached_tokens"], kv
    assert pd_info(decode)["num_failed_transfers"] >= 4
    # The gateway keeps answering (an error: it has no prefill server left), and
    # the decode server still serves ordinary requests.
    assert httpx.get(f"{cluster.url}/health", timeout=30).status_code == 200
    assert httpx.post(f"{cluster.url}/generate", json={"text": "after"}, timeout=60).status_code >= 500
    assert post(decode, "/generate", {"text": "still here", "sampling_params": {"max_new_tokens": 2}})
