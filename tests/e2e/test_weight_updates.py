"""Live weight updates (the RL loop): from tensors (shared memory) and from disk.
After each update greedy outputs equal transformers' with the new weights; a
request running during an update finishes entirely on the old weights."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.conftest import assert_no_leak, hf_greedy
from tests.e2e.weight_updates import GREEDY, PROMPTS, STEPS, engine_with_new_weights, start_long_request


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory):
    yield from engine_with_new_weights(tiny_model_factory, tmp_path_factory, seed=123)


def greedy(engine):
    return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def test_update_from_tensor_then_from_disk(setup):
    engine, path, old, new, _ = setup
    assert greedy(engine) == hf_greedy(old, PROMPTS, STEPS)
    ok, msg = engine.update_weights_from_tensor(list(new.state_dict().items()), weight_version="step-1")
    assert ok, msg
    assert greedy(engine) == hf_greedy(new, PROMPTS, STEPS)
    assert engine.get_server_info()["weight_version"] == "step-1"
    out = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
    assert out["meta_info"]["weight_version"] == "step-1"
    name = "model.layers.0.self_attn.k_proj.weight"  # a shard of our merged qkv projection
    got = engine.get_weights_by_name(name, truncate_size=50)
    assert got == pytest.approx(new.state_dict()[name].flatten()[:50].tolist())
    ok, msg = engine.update_weights_from_disk(str(path))  # back to the original checkpoint
    assert ok, msg
    assert greedy(engine) == hf_greedy(old, PROMPTS, STEPS)
    assert engine.get_server_info()["weight_version"] != "step-1"
    assert_no_leak(engine)


def test_running_request_finishes_on_old_weights(setup):
    engine, path, old, new, new_path = setup
    engine.update_weights_from_disk(str(path), weight_version="old")
    long_params = {**GREEDY, "max_new_tokens": 48}
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        engine.generate(input_ids=PROMPTS[0], sampling_params=long_params)))
    thread.start()
    while engine.get_server_info()["num_running_reqs"] == 0 and thread.is_alive():
        pass
    ok, msg = engine.update_weights_from_disk(str(new_path), weight_version="new")  # waits for it
    thread.join()
    assert ok, msg
    assert result["output_ids"] == hf_greedy(old, PROMPTS[:1], 48)[0]  # never mixed
    assert result["meta_info"]["weight_version"] == "old"
    assert greedy(engine) == hf_greedy(new, PROMPTS, STEPS)


def test_bad_updates_are_reported_and_serving_continues(setup):
    engine, path, old, _, _ = setup
    engine.update_weights_from_disk(str(path))
    ok, msg = engine.update_weights_from_tensor([("model.layers.0.mlp.down_proj.weight", torch.zeros(3, 3))])
    assert not ok and "down_proj" in msg
    ok, msg = engine.update_weights_from_tensor([("no.such.weight", torch.zeros(3))])
    assert not ok and "no.such.weight" in msg
    with pytest.raises(ValueError, match="unknown weight name"):
        engine.get_weights_by_name("model.layers.0.nothing.weight")
    assert greedy(engine) == hf_greedy(old, PROMPTS, STEPS)


def test_http_endpoints_with_admin_key(tiny_model_factory, setup):
    import httpx

    from tests.server_utils import running_server

    _, path, old, new, new_path = setup
    with running_server(path, "--admin-api-key", "adm") as (_, base):
        auth = {"Authorization": "Bearer adm"}
        name = "model.layers.1.mlp.up_proj.weight"
        assert httpx.post(base + "/update_weights_from_disk", json={"model_path": str(new_path)}).status_code == 401
        r = httpx.post(base + "/update_weights_from_disk", headers=auth, timeout=60,
                       json={"model_path": str(new_path), "weight_version": "v2"})
        assert r.status_code == 200 and r.json()["weight_version"] == "v2", r.text
        got = httpx.post(base + "/get_weights_by_name", headers=auth, json={"name": name, "truncate_size": 10}).json()
        assert got == pytest.approx(new.state_dict()[name].flatten()[:10].tolist())
        assert httpx.get(base + "/get_server_info").json()["weight_version"] == "v2"
        r = httpx.post(base + "/update_weights_from_disk", headers=auth, json={"model_path": "/no/such/dir"})
        assert r.status_code == 400 and r.json()["success"] is False
        bad = httpx.post(base + "/get_weights_by_name", headers=auth, json={"name": "nope"})
        assert bad.status_code == 400
        assert httpx.post(base + "/pause_generation", json={}).status_code == 401
        assert httpx.post(base + "/pause_generation", headers=auth, json={"mode": "in_place"}).status_code == 200
        assert httpx.get(base + "/get_server_info").json()["paused"] is True
        assert httpx.post(base + "/pause_generation", headers=auth, json={"mode": "x"}).status_code == 400
        assert httpx.post(base + "/continue_generation", headers=auth).status_code == 200
        out = httpx.post(base + "/generate", json={"input_ids": PROMPTS[0], "sampling_params": GREEDY}).json()
        assert out["output_ids"] == hf_greedy(new, PROMPTS[:1], STEPS)[0]


def test_pause_in_place_then_continue_and_pause_abort(setup):
    engine, path, old, new, new_path = setup
    engine.update_weights_from_disk(str(path))
    result: dict = {}
    thread = start_long_request(engine, result, 400)
    engine.pause_generation()  # in place: the request keeps its KV and waits
    info = engine.get_server_info()
    assert info["paused"] and info["num_running_reqs"] == 1
    thread.join(timeout=1.0)
    assert thread.is_alive()  # nothing was scheduled while paused
    engine.continue_generation()
    thread.join()
    assert result["output_ids"] == hf_greedy(old, PROMPTS[:1], 400)[0]  # unchanged by the pause

    result = {}
    thread = start_long_request(engine, result, 400)
    engine.pause_generation("abort")  # ends it, so an update applies while paused
    thread.join()
    assert result["meta_info"]["finish_reason"]["type"] == "abort"
    ok, msg = engine.update_weights_from_disk(str(new_path))
    assert ok, msg
    engine.continue_generation()
    assert greedy(engine) == hf_greedy(new, PROMPTS, STEPS)
    with pytest.raises(ValueError, match="mode"):
        engine.pause_generation("sideways")
    assert not engine.get_server_info()["paused"]
    assert_no_leak(engine)


def test_concurrent_updates_and_flush_each_get_their_own_answer(setup):
    """Two updates asked while a request runs (one good, one with a bad path) wait
    their turn and each caller gets its own answer; a flush asked meanwhile is
    refused to the flusher. The pause makes "while a request runs" certain."""
    engine, path, old, new, new_path = setup
    engine.update_weights_from_disk(str(path), weight_version="base")
    result: dict = {}
    thread = start_long_request(engine, result, 48)
    engine.pause_generation()  # the request keeps its KV: the updates must wait for it
    answers: dict = {}
    updaters = [threading.Thread(target=lambda v=v, p=p: answers.update({v: engine.update_weights_from_disk(
        p, weight_version=v)})) for v, p in (("good", str(new_path)), ("bad", "/no/such/dir"))]
    for t in updaters:
        t.start()
    while engine.get_server_info()["pending_weight_updates"] < 2 and all(t.is_alive() for t in updaters):
        pass
    assert engine.flush_cache() is False  # refused: a request runs and updates wait
    engine.continue_generation()
    for t in updaters + [thread]:
        t.join()
    assert answers["good"] == (True, "")
    ok, msg = answers["bad"]
    assert not ok and "/no/such/dir" in msg, msg
    assert result["meta_info"]["weight_version"] == "base"
    assert result["output_ids"] == hf_greedy(old, PROMPTS[:1], 48)[0]  # never mixed
    info = engine.get_server_info()
    assert info["weight_version"] == "good" and info["pending_weight_updates"] == 0
    assert greedy(engine) == hf_greedy(new, PROMPTS, STEPS)
    assert engine.flush_cache() is True
    assert_no_leak(engine)
