"""Data parallelism inside one server on the CPU. An Engine with two replicas
of two tensor-parallel ranks each (--dp-size 2 --tp-size 2, four scheduler
processes): the same greedy tokens as transformers (and so as dp 1), both
replicas used, routed_dp_rank honoured, KV freed on both, unseeded samples
that differ across replicas, weight updates that reach every rank. Over HTTP
(two replicas of one rank): /get_load per replica, total_tokens balancing, and
SGLang's gateway in its --dp-aware mode."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from radixserve import Engine
from tests.conftest import hf_greedy, load_hf_model
from tests.e2e.weight_trainer import broadcast_tensors
from tests.e2e.weight_updates import perturbed_copy
from tests.server_utils import MODEL, free_port, running_server

DP = 2
TP = 2  # the Engine's replicas; the HTTP server's have one rank each
PROMPT_LENS = [3, 9, 14, 22, 30, 41]
NEW_TOKENS = 16
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


@pytest.fixture(scope="module")
def setup(tiny_model_factory):
    """(engine with two replicas, transformers' model, prompts, transformers' greedy outputs);
    small KV pools (192 tokens per replica) and chunks of 16."""
    path = tiny_model_factory("llama")
    hf = load_hf_model(path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, hf.config.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]
    expected = hf_greedy(hf, prompts, NEW_TOKENS)
    engine = Engine(model_path=str(path), dp_size=DP, tp_size=TP, load_balance_method="round_robin", dtype="float32",
                    chunked_prefill_size=16, max_total_tokens=192, log_level="warning")
    try:
        yield engine, hf, prompts, expected
    finally:
        engine.shutdown()


def replicas(engine) -> list:
    return engine.get_server_info()["internal_states"]


def prefilled(engine) -> list:
    return [s["num_prefill_tokens"] for s in replicas(engine)]


def assert_replicas_free(engine) -> None:
    """No request holds KV on either replica, and nothing leaked on either."""
    states = replicas(engine)
    assert [s["dp_rank"] for s in states] == list(range(DP))
    for s in states:
        ranks = s["tp_ranks"]
        assert len(ranks) == TP and all(r["kv_cache"] == s["kv_cache"] for r in ranks), states
        kv = s["kv_cache"]
        assert kv["in_use_tokens"] == 0, states
        assert kv["total_tokens"] == kv["free_tokens"] + kv["in_use_tokens"] + kv["cached_tokens"], states


def greedy_ids(engine, prompts, **kwargs) -> list:
    return [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=GREEDY, **kwargs)]


def test_greedy_matches_transformers_and_both_replicas_serve(setup):
    engine, _, prompts, expected = setup
    engine.flush_cache()
    before = prefilled(engine)
    assert greedy_ids(engine, prompts) == expected
    after = prefilled(engine)
    # Round robin: prompts 0, 2, 4 on replica 0 and 1, 3, 5 on replica 1.
    assert [a - b for a, b in zip(after, before)] == [sum(PROMPT_LENS[0::2]), sum(PROMPT_LENS[1::2])]
    info = engine.get_server_info()
    assert info["dp_size"] == DP and info["kv_cache"]["total_tokens"] == DP * info["max_total_num_tokens"]
    assert_replicas_free(engine)


def test_routed_dp_rank_is_honoured(setup):
    engine, _, prompts, expected = setup
    engine.flush_cache()
    for rank in range(DP):
        before = prefilled(engine)
        assert greedy_ids(engine, prompts[:3], routed_dp_rank=rank) == expected[:3]
        grew = [a - b for a, b in zip(prefilled(engine), before)]
        assert grew[rank] == sum(PROMPT_LENS[:3]) and grew[1 - rank] == 0
    with pytest.raises(ValueError, match="routed_dp_rank"):
        engine.generate(input_ids=prompts[0], routed_dp_rank=DP)
    assert_replicas_free(engine)


def test_unseeded_samples_differ_and_seeded_ones_agree_across_replicas(setup):
    """Replicas share --random-seed but draw different seeds for unseeded
    requests: four samples of one prompt (two per replica) all differ."""
    engine, _, prompts, _ = setup
    params = {"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True}
    samples = [o["output_ids"] for o in engine.generate(input_ids=prompts[1], sampling_params={**params, "n": 4})]
    assert len({tuple(s) for s in samples}) == 4, samples
    seeded = {**params, "sampling_seed": 11}
    on_each = [engine.generate(input_ids=prompts[1], sampling_params=seeded, routed_dp_rank=r)["output_ids"]
               for r in range(DP)]
    assert on_each[0] == on_each[1]


def test_weight_updates_reach_every_replica(setup, tmp_path):
    engine, hf, prompts, expected = setup
    new = perturbed_copy(hf, seed=21)
    want = hf_greedy(new, prompts[:2], NEW_TOKENS)
    ok, msg = engine.update_weights_from_tensor(list(new.state_dict().items()), weight_version="dp-t")
    assert ok, msg
    for rank in range(DP):
        assert greedy_ids(engine, prompts[:2], routed_dp_rank=rank) == want
    assert {s["weight_version"] for s in replicas(engine)} == {"dp-t"}
    # From a trainer's process group: every rank of every replica joins (1 + DP * TP members).
    back = perturbed_copy(hf, seed=22)
    port, group = free_port(), "dp_test_group"
    tensors = [t.contiguous() for t in back.state_dict().values()]
    trainer = mp.get_context("spawn").Process(target=broadcast_tensors, args=(tensors, port, 1 + DP * TP, group),
                                              daemon=True)
    trainer.start()
    try:
        ok, msg = engine.init_weights_update_group("127.0.0.1", port, 1, 1 + DP * TP, group, "gloo")
        assert ok, msg
        items = list(back.state_dict().items())
        ok, msg = engine.update_weights_from_distributed(
            [n for n, _ in items], [str(t.dtype) for _, t in items], [list(t.shape) for _, t in items], group)
        assert ok, msg
        trainer.join(timeout=60)
        assert trainer.exitcode == 0
        assert engine.destroy_weights_update_group(group)[0]
    finally:
        trainer.kill()
    for rank in range(DP):
        assert greedy_ids(engine, prompts[:2], routed_dp_rank=rank) == hf_greedy(back, prompts[:2], NEW_TOKENS)
    # A refusal from the replicas comes back once, naming the replica.
    ok, msg = engine.update_weights_from_disk(str(tmp_path / "missing"))
    assert not ok and msg.startswith("dp rank 0:")
    assert_replicas_free(engine)


# ---- over HTTP: /get_load per replica, and SGLang's gateway in --dp-aware mode ----
@pytest.fixture(scope="module")
def server(tiny_model_factory):
    """total_tokens balancing: a request goes where the fewest tokens are in flight."""
    with running_server(tiny_model_factory("llama"), "--dp-size", str(DP),
                        "--load-balance-method", "total_tokens") as (_, base):
        yield base


def post(url: str, path: str, body: dict) -> dict:
    r = httpx.post(f"{url}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def http_prefilled(base: str) -> list:
    return [s["num_prefill_tokens"] for s in httpx.get(f"{base}/server_info").json()["internal_states"]]


def test_get_load_has_one_record_per_replica_and_total_tokens_spreads_load(server):
    long_body = {"input_ids": list(range(100, 160)), "sampling_params": {**GREEDY, "max_new_tokens": 300}}
    busy = threading.Thread(target=post, args=(server, "/generate", {**long_body, "rid": "long"}))
    busy.start()
    deadline = time.time() + 60
    while sum(r["num_reqs"] for r in httpx.get(f"{server}/get_load").json()) == 0:  # only guards a hang
        assert time.time() < deadline and busy.is_alive()
        time.sleep(0.05)
    load = httpx.get(f"{server}/get_load").json()
    assert [r["dp_rank"] for r in load] == [0, 1]
    long_on = next(r["dp_rank"] for r in load if r["num_reqs"] == 1)
    before = http_prefilled(server)
    post(server, "/generate", {"input_ids": [7, 8, 9], "sampling_params": {**GREEDY, "max_new_tokens": 2}})
    grew = [a - b for a, b in zip(http_prefilled(server), before)]
    assert grew[1 - long_on] == 3  # the short request went to the other replica
    httpx.post(f"{server}/abort_request", json={"rid": "long"})
    busy.join(timeout=120)
    assert httpx.get(f"{server}/get_load").json() == [
        {"dp_rank": r, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0} for r in range(DP)]


def test_openai_bodies_take_data_parallel_rank(server):
    for rank in range(DP):
        before = http_prefilled(server)
        post(server, "/v1/completions", {"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 2,
                                         "data_parallel_rank": rank})
        grew = [a - b for a, b in zip(http_prefilled(server), before)]
        assert grew[rank] > 0 and grew[1 - rank] == 0
    r = httpx.post(f"{server}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "routed_dp_rank": DP})
    assert r.status_code == 400 and r.json()["error"]["param"] == "routed_dp_rank"


@pytest.mark.skipif(importlib.util.find_spec("sglang_router") is None, reason="needs the [router] extra")
def test_gateway_dp_aware_routes_to_each_replica(server, tmp_path):
    """--dp-aware: the gateway reads dp_size from /server_info, treats each
    replica as a worker of its own and names it in data_parallel_rank."""
    port = free_port()
    log = open(tmp_path / "router.log", "w")
    router = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--port", str(port),
                               "--worker-urls", server, "--dp-aware", "--policy", "round_robin",
                               "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    gateway = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while not _healthy(gateway):  # only guards a hang
            assert router.poll() is None and time.time() < deadline, (tmp_path / "router.log").read_text()
            time.sleep(0.3)
        before = http_prefilled(server)
        body = {"text": "one two three", "sampling_params": {**GREEDY, "max_new_tokens": 4}}
        direct = post(server, "/generate", body)["output_ids"]
        after_direct = http_prefilled(server)
        answers = [post(gateway, "/generate", body)["output_ids"] for _ in range(4)]
        assert answers == [direct] * 4
        # Round robin over the two replica-workers: each replica served some of
        # the four (without data_parallel_rank, total_tokens would send all four
        # sequential requests to replica 0).
        grew = [a - b for a, b in zip(http_prefilled(server), after_direct)]
        assert all(g > 0 for g in grew), (before, after_direct, grew)
    finally:
        router.terminate()
        router.wait(timeout=30)
        log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
