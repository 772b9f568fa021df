"""Tensor parallelism, the process side: two scheduler ranks (gloo on the CPU,
one intra-op thread each) that receive rank 0's messages and must stay in
lockstep, each holding half of the model; greedy tokens equal transformers'
exactly (the other families: test_tensor_parallel_families.py); the same tests run on NCCL with
RADIXSERVE_TEST_DEVICE=cuda (two GPUs) for the multi-GPU issue.

One tp=2 engine is shared by the module (chunked prefill of 16 tokens and a
KV pool small enough to force retraction); the rank-death test starts its own
server, since it kills it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from radixserve import Engine
from radixserve.entrypoints.launch_server import parse_args
from tests.conftest import hf_greedy, load_hf_model
from tests.e2e.weight_trainer import broadcast_tensors
from tests.e2e.weight_updates import perturbed_copy
from tests.server_utils import free_port, start_server

# cpu (gloo) by default; cuda runs the same tests on NCCL, one GPU per rank
# (float32 everywhere, as transformers' reference; small KV pools so that the
# servers started here fit next to the module's engine on the same GPUs).
DEVICE = os.environ.get("RADIXSERVE_TEST_DEVICE", "cpu")
DEVICE_FLAGS = ["--device", DEVICE, "--dtype", "float32", "--max-total-tokens", "4096"]
TP = 2
PROMPT_LENS = [3, 7, 12, 18, 25, 31, 40, 47]
NEW_TOKENS = 32
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


def make_prompts(vocab: int) -> list:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory):
    """(engine, checkpoint path, transformers model, prompts, transformers' greedy outputs)."""
    path = tiny_model_factory("llama")
    hf = load_hf_model(path)
    prompts = make_prompts(hf.config.vocab_size)
    expected = hf_greedy(hf, prompts, NEW_TOKENS)
    # Every parallelism argument, as the Engine takes them (SGLang's names).
    engine = Engine(model_path=str(path), device=DEVICE, dtype="float32", tp_size=TP, ep_size=1, nnodes=1, node_rank=0,
                    dist_init_addr=f"127.0.0.1:{free_port()}", dist_timeout=120, base_gpu_id=0,
                    chunked_prefill_size=16, max_total_tokens=192, log_level="warning")
    try:
        yield engine, path, hf, prompts, expected
    finally:
        engine.shutdown()


def rank_states(engine) -> list:
    return engine.get_server_info()["tp_ranks"]


def assert_ranks_free_and_agree(engine) -> None:
    """No request holds KV on any rank, nothing leaked, and the ranks' counts
    are the same (their scheduling is replicated)."""
    states = rank_states(engine)
    assert [s["tp_rank"] for s in states] == list(range(TP))
    for s in states:
        kv = s["kv_cache"]
        assert kv["in_use_tokens"] == 0, states
        assert kv["total_tokens"] == kv["free_tokens"] + kv["in_use_tokens"] + kv["cached_tokens"], states
    assert all(s["kv_cache"] == states[0]["kv_cache"] for s in states), states


def greedy_ids(engine, prompts) -> list:
    return [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=GREEDY)]


def test_flag_aliases():
    assert parse_args(["--tp", "2", "--ep", "2"]).tp_size == 2
    assert parse_args(["--tp", "2", "--ep", "2"]).ep_size == 2
    args = parse_args(["--tensor-parallel-size", "4", "--expert-parallel-size", "2"])
    assert (args.tp_size, args.ep_size) == (4, 2)
    assert parse_args(["--tp-size", "2", "--ep-size", "1"]).tp_size == 2
    with pytest.raises(ValueError, match="ep_size"):
        parse_args(["--tp", "2", "--ep", "3"])


def test_node_rank_above_zero_needs_launch_server():
    with pytest.raises(ValueError, match="launch_server"):
        Engine(tp_size=2, nnodes=2, node_rank=1, dist_init_addr="127.0.0.1:1")


def test_server_info_reports_parallelism_and_each_rank(setup):
    engine = setup[0]
    info = engine.get_server_info()
    assert (info["tp_size"], info["ep_size"]) == (TP, 1)
    states = info["tp_ranks"]
    assert len(states) == TP and len({s["pid"] for s in states}) == TP
    # The ranks' allocators are the same size (the smallest of their profiles).
    assert {s["max_total_num_tokens"] for s in states} == {info["max_total_num_tokens"]} == {192}


def test_greedy_matches_transformers_with_chunks_and_retraction(setup):
    """Eight prompts up to 47 tokens, chunks of 16, and 192 KV tokens for all
    of them at once: some are retracted and resumed on both ranks alike."""
    engine, _, _, prompts, expected = setup
    before = engine.get_server_info()["num_retractions"]
    assert greedy_ids(engine, prompts) == expected
    assert engine.get_server_info()["num_retractions"] > before
    assert_ranks_free_and_agree(engine)


def test_radix_hit(setup):
    engine, _, _, prompts, expected = setup
    engine.flush_cache()
    first = engine.generate(input_ids=prompts[6], sampling_params=GREEDY)
    again = engine.generate(input_ids=prompts[6], sampling_params=GREEDY)
    assert first["meta_info"]["cached_tokens"] == 0
    assert again["meta_info"]["cached_tokens"] > 0
    assert first["output_ids"] == again["output_ids"] == expected[6]
    assert_ranks_free_and_agree(engine)


def test_sampling_and_grammar_keep_ranks_in_lockstep(setup):
    """Sampled and grammar-constrained rows take rank 0's ids on every rank:
    afterwards both ranks hold the same KV, and greedy still matches."""
    engine, _, _, prompts, expected = setup
    params = [{"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 16, "sampling_seed": 7},
              {"temperature": 0.7, "max_new_tokens": 16, "regex": "(yes|no), (red|green|blue)"}]
    sampled, constrained = engine.generate(input_ids=prompts[:2], sampling_params=params)
    assert len(sampled["output_ids"]) > 0
    assert re.fullmatch("(yes|no), (red|green|blue)", constrained["text"]), constrained["text"]
    assert_ranks_free_and_agree(engine)
    assert greedy_ids(engine, prompts[:2]) == expected[:2]


def test_abort_mid_decode_frees_kv_on_every_rank(setup):
    engine, _, _, prompts, _ = setup
    result = {}
    params = {"temperature": 0, "max_new_tokens": 180, "ignore_eos": True}  # 3 + 180 tokens fit the pool
    thread = threading.Thread(target=lambda: result.update(
        engine.generate(input_ids=prompts[0], sampling_params=params, rid="long-one")))
    thread.start()
    deadline = time.time() + 60  # only against a hang
    while all(s["num_running_reqs"] == 0 for s in rank_states(engine)) and time.time() < deadline:
        time.sleep(0.05)
    states = rank_states(engine)
    assert all(s["kv_cache"]["in_use_tokens"] > 0 for s in states), states  # held on both ranks
    engine.abort_request("long-one")
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert result["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(result["output_ids"]) < 180
    assert_ranks_free_and_agree(engine)


def test_weight_updates_from_tensor_and_disk(setup):
    engine, path, hf, prompts, expected = setup
    new = perturbed_copy(hf, seed=5)
    ok, msg = engine.update_weights_from_tensor(list(new.state_dict().items()), weight_version="t1")
    assert ok, msg
    assert greedy_ids(engine, prompts[:3]) == hf_greedy(new, prompts[:3], NEW_TOKENS)
    name = "model.layers.1.mlp.up_proj.weight"
    assert engine.get_weights_by_name(name, 20) == pytest.approx(new.state_dict()[name].flatten()[:20].tolist())
    ok, msg = engine.update_weights_from_disk(str(path))  # back to the original checkpoint
    assert ok, msg
    assert greedy_ids(engine, prompts[:3]) == expected[:3]
    assert_ranks_free_and_agree(engine)


def test_weight_update_from_distributed_reaches_every_rank(setup):
    """Each rank joins the trainer's group as its own member (1 + tp ranks)."""
    engine, _, hf, prompts, expected = setup
    new = perturbed_copy(hf, seed=9)
    port, group = free_port(), "tp_test_group"
    tensors = [t.contiguous() for t in new.state_dict().values()]
    proc = mp.get_context("spawn").Process(target=broadcast_tensors, args=(tensors, port, 1 + TP, group),
                                           daemon=True)
    proc.start()
    try:
        ok, msg = engine.init_weights_update_group("127.0.0.1", port, 1, 1 + TP, group, "gloo")
        assert ok, msg
        items = list(new.state_dict().items())
        ok, msg = engine.update_weights_from_distributed(
            [n for n, _ in items], [str(t.dtype) for _, t in items], [list(t.shape) for _, t in items], group)
        assert ok, msg
        proc.join(timeout=60)
        assert proc.exitcode == 0
        assert engine.destroy_weights_update_group(group)[0]
        assert greedy_ids(engine, prompts[:2]) == hf_greedy(new, prompts[:2], NEW_TOKENS)
    finally:
        if proc.is_alive():
            proc.kill()
        engine.update_weights_from_disk(str(setup[1]))
    assert greedy_ids(engine, prompts[:2]) == expected[:2]


def test_release_and_resume_on_every_rank(setup):
    engine, _, _, prompts, expected = setup
    assert engine.release_memory_occupation() > 0
    assert engine.resume_memory_occupation() > 0
    assert greedy_ids(engine, prompts[:2]) == expected[:2]
    assert_ranks_free_and_agree(engine)


def test_rank_death_fails_requests_and_exits(tiny_model_factory, tmp_path):
    """Kill rank 1 of a tp=2 server (started with the --tp alias): the pending
    request fails with the dead-scheduler error, and the server exits non-zero
    instead of hanging in a collective."""
    with open(tmp_path / "log", "w") as log:
        proc, base = start_server(tiny_model_factory("llama"), "--tp", str(TP), *DEVICE_FLAGS,
                                  "--dist-timeout", "120", log=log)
    try:
        info = httpx.get(f"{base}/get_server_info", timeout=30).json()
        assert info["tp_size"] == TP
        rank1 = info["tp_ranks"][1]["pid"]
        outcome = {}

        def long_request() -> None:
            try:
                outcome["response"] = httpx.post(f"{base}/generate", timeout=120, json={
                    "input_ids": [11, 12, 13, 14],
                    "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}})
            except httpx.HTTPError as e:  # the server may be gone before it answers
                outcome["error"] = e

        thread = threading.Thread(target=long_request)
        thread.start()
        deadline = time.time() + 60  # only against a hang
        while httpx.get(f"{base}/get_server_info", timeout=30).json()["num_running_reqs"] == 0:
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(rank1, signal.SIGKILL)
        thread.join(timeout=60)
        assert not thread.is_alive(), "the pending request hung after rank 1 died"
        if "response" in outcome:
            assert outcome["response"].status_code != 200
            assert "radixserve-scheduler" in outcome["response"].text and "exited" in outcome["response"].text
        try:  # a later request fails too (unless the server has already gone)
            later = httpx.post(f"{base}/generate", timeout=30, json={"input_ids": [11, 12]})
            assert later.status_code != 200 and "exited" in later.text, later.text
        except httpx.HTTPError:
            pass
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_two_nodes_on_loopback(setup, tiny_model_factory, tmp_path):
    """--nnodes 2: node 1 runs only rank 1 (no HTTP) and meets node 0's rank 0
    at --dist-init-addr; node 0 serves, with transformers' tokens. When node 0
    stops, node 1's ranks lose their peer and node 1's launcher exits on its own."""
    _, path, _, prompts, expected = setup
    addr = f"127.0.0.1:{free_port()}"
    common = ["--tp", str(TP), "--nnodes", "2", "--dist-init-addr", addr, *DEVICE_FLAGS]
    with open(tmp_path / "node1.log", "w") as log1:
        # (one host: node 1's rank takes the second GPU)
        node1 = subprocess.Popen([sys.executable, "-m", "radixserve.launch_server", "--model-path", str(path),
                                  *common, "--node-rank", "1", "--base-gpu-id", "1"],
                                 stdout=log1, stderr=subprocess.STDOUT)
    try:
        with open(tmp_path / "node0.log", "w") as log0:
            node0, base = start_server(path, *common, "--node-rank", "0", log=log0)
        try:
            r = httpx.post(f"{base}/generate", timeout=120,
                           json={"input_ids": prompts[3], "sampling_params": GREEDY})
            assert r.status_code == 200 and r.json()["output_ids"] == expected[3]
            info = httpx.get(f"{base}/get_server_info", timeout=30).json()
            assert [s["tp_rank"] for s in info["tp_ranks"]] == [0, 1]
            assert node1.poll() is None  # node 1 serves nothing itself, and keeps running
        finally:
            node0.terminate()
            assert node0.wait(timeout=60) == 0
        assert node1.wait(timeout=120) != 0  # its rank failed once rank 0 was gone
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
