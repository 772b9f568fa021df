"""RL integration: weights broadcast by a trainer process over a torch.distributed
group, and releasing / resuming the engine's memory between rollouts.

The trainer is a real separate process (spawned) holding a transformers model;
after its broadcast the engine's greedy outputs equal transformers' with those
weights. Release/resume must leave outputs identical and give the KV memory
back to the operating system while released.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import psutil
import pytest
import torch

from radixserve.utils.cpu_malloc import IDLE_TRIM_S
from tests.conftest import assert_no_leak, hf_greedy
from tests.e2e.weight_updates import GREEDY, PROMPTS, STEPS, engine_with_new_weights, start_long_request
from tests.server_utils import free_port

GROUP = "test_weight_update_group"


def broadcast_checkpoint(path: str, port: int, group_name: str, extra_first: bool) -> None:
    """The trainer (rank 0): join the group, broadcast every weight of the
    checkpoint at path in state_dict order (after a bogus one if extra_first)."""
    import torch.distributed as dist

    from radixserve.model_executor.weight_sync import init_custom_process_group
    from tests.conftest import load_hf_model

    group = init_custom_process_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, group_name)
    tensors = [t.contiguous() for t in load_hf_model(path).state_dict().values()]
    if extra_first:
        tensors.insert(0, torch.ones(3))
    for t in tensors:
        dist.broadcast(t, src=0, group=group)
    dist.destroy_process_group(group)


def start_trainer(path, group_name: str = GROUP, extra_first: bool = False):
    port = free_port()
    proc = mp.get_context("spawn").Process(target=broadcast_checkpoint,
                                           args=(str(path), port, group_name, extra_first), daemon=True)
    proc.start()
    return proc, port


def announced(model, extra_first: bool = False):
    """names, dtypes, shapes of the trainer's broadcasts, as update_weights_from_distributed takes them."""
    items = list(model.state_dict().items())
    if extra_first:
        items.insert(0, ("model.no_such.weight", torch.ones(3)))
    return ([n for n, _ in items], [str(t.dtype) for _, t in items], [list(t.shape) for _, t in items])


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory):
    yield from engine_with_new_weights(tiny_model_factory, tmp_path_factory, seed=7)


def greedy(engine):
    return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def kv_pool_bytes(engine) -> int:
    """Per slot: K and V of 2 layers x 2 KV heads x head_dim 16 in float32; one
    reserved page besides the usable tokens (the allocator's padding slot)."""
    info = engine.get_server_info()
    slots = info["kv_cache"]["total_tokens"] + info["page_size"]
    return slots * 2 * 2 * 2 * 16 * 4


def scheduler_rss(engine) -> int:
    scheduler = next(p for p in engine._procs if p.name == "radixserve-scheduler")
    return psutil.Process(scheduler.pid).memory_info().rss


def test_update_weights_from_distributed(setup):
    engine, path, old, new, new_path = setup
    engine.update_weights_from_disk(str(path))
    trainer, port = start_trainer(new_path)
    ok, msg = engine.init_weights_update_group("127.0.0.1", port, 1, 2, GROUP, backend="gloo")
    assert ok, msg
    # A request running when the update arrives finishes entirely on the old weights.
    running: dict = {}
    thread = start_long_request(engine, running, 40)
    ok, msg = engine.update_weights_from_distributed(*announced(new), group_name=GROUP, weight_version="dist-1")
    thread.join()
    trainer.join(timeout=60)
    assert ok, msg
    assert trainer.exitcode == 0
    assert running["output_ids"] == hf_greedy(old, PROMPTS[:1], 40)[0]
    assert running["meta_info"]["weight_version"] != "dist-1"
    assert greedy(engine) == hf_greedy(new, PROMPTS, STEPS)
    assert engine.get_server_info()["weight_version"] == "dist-1"
    name = "model.layers.1.self_attn.v_proj.weight"
    assert engine.get_weights_by_name(name, 30) == pytest.approx(new.state_dict()[name].flatten()[:30].tolist())
    ok, msg = engine.destroy_weights_update_group(GROUP)
    assert ok, msg
    assert_no_leak(engine)


def test_distributed_errors_are_reported_and_the_trainer_never_blocks(setup):
    engine, path, old, new, new_path = setup
    engine.update_weights_from_disk(str(path))
    ok, msg = engine.update_weights_from_distributed(*announced(new), group_name="no_such_group")
    assert not ok and "no_such_group" in msg
    ok, msg = engine.destroy_weights_update_group("no_such_group")
    assert not ok and "no_such_group" in msg
    trainer, port = start_trainer(new_path, extra_first=True)
    ok, msg = engine.init_weights_update_group("127.0.0.1", port, 1, 2, GROUP)  # default backend: gloo on CPU
    assert ok, msg
    ok, again = engine.init_weights_update_group("127.0.0.1", port, 1, 2, GROUP)
    assert not ok and "already exists" in again
    ok, msg = engine.update_weights_from_distributed(*announced(new, extra_first=True), group_name=GROUP)
    trainer.join(timeout=60)
    assert not ok and "no_such.weight" in msg
    assert trainer.exitcode == 0  # every broadcast was received, though the update failed
    assert engine.destroy_weights_update_group(GROUP)[0]
    assert greedy(engine) == hf_greedy(old, PROMPTS, STEPS)  # the bad name came first: nothing was loaded


def test_release_and_resume_memory_occupation(setup):
    engine, path, old, _, _ = setup
    engine.update_weights_from_disk(str(path))
    before = greedy(engine)
    assert before == hf_greedy(old, PROMPTS, STEPS)
    # A pool page is resident once a request wrote it (the OS zeroes it on first
    # touch): distinct prompts fill about 32k slots, which the prefix cache keeps.
    engine.generate(input_ids=[[3 + (7 * i + j) % 1000 for j in range(500)] for i in range(64)],
                    sampling_params={"temperature": 0, "max_new_tokens": 1})
    cached = engine.get_server_info()["kv_cache"]["cached_tokens"]
    assert cached >= 30_000
    info = engine.get_server_info()
    written = kv_pool_bytes(engine) * cached // (info["kv_cache"]["total_tokens"] + info["page_size"])
    # The idle scheduler gives its free heap pages back (IdleTrim): what the release
    # gives back after that is the pool's.
    time.sleep(IDLE_TRIM_S + 2.0)
    rss = scheduler_rss(engine)
    released = engine.release_memory_occupation()
    assert released == kv_pool_bytes(engine)  # on CPU the weights stay, the KV pool goes
    # given back to the OS, not just dropped (the written pages: 16 MB of 67 MB)
    assert rss - scheduler_rss(engine) > written * 3 // 4, (rss, scheduler_rss(engine), written)
    info = engine.get_server_info()
    assert info["paused"] and info["kv_cache"]["cached_tokens"] == 0  # the prefix cache was flushed
    with pytest.raises(ValueError, match="already released"):
        engine.release_memory_occupation()

    # While released a request waits in the queue; it runs after resume.
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        engine.generate(input_ids=PROMPTS[1], sampling_params=GREEDY)), daemon=True)  # a failed test must not hang the run
    thread.start()
    deadline = time.monotonic() + 60
    while engine.get_server_info()["num_waiting_reqs"] == 0 and thread.is_alive() and time.monotonic() < deadline:
        pass
    thread.join(timeout=1.0)
    assert thread.is_alive() and engine.get_server_info()["num_waiting_reqs"] == 1  # queued, not run
    assert engine.resume_memory_occupation() == released
    assert scheduler_rss(engine) - rss < released // 4  # allocated again, not on top of the old pool
    thread.join()
    assert result["output_ids"] == before[1]
    assert greedy(engine) == before
    with pytest.raises(ValueError, match="not released"):
        engine.resume_memory_occupation()
    assert not engine.get_server_info()["paused"]
    assert_no_leak(engine)


def test_release_is_refused_while_requests_run(setup):
    engine, path, old, _, _ = setup
    engine.update_weights_from_disk(str(path))
    result: dict = {}
    thread = start_long_request(engine, result, 200)
    with pytest.raises(ValueError, match="running or waiting"):
        engine.release_memory_occupation()
    engine.pause_generation("abort")  # the documented way to release at once
    thread.join()
    assert result["meta_info"]["finish_reason"]["type"] == "abort"
    assert engine.release_memory_occupation() > 0
    engine.continue_generation()  # lifts the user's pause; the release still holds scheduling
    assert engine.get_server_info()["paused"]
    engine.resume_memory_occupation()
    assert greedy(engine) == hf_greedy(old, PROMPTS, STEPS)
    assert_no_leak(engine)


def test_http_endpoints(setup):
    import httpx

    from tests.server_utils import running_server

    _, path, old, new, new_path = setup
    with running_server(path, "--admin-api-key", "adm") as (_, base):
        auth = {"Authorization": "Bearer adm"}
        assert httpx.post(base + "/release_memory_occupation").status_code == 401
        assert httpx.post(base + "/init_weights_update_group", json={}).status_code == 401
        r = httpx.post(base + "/release_memory_occupation", headers=auth)
        assert r.status_code == 200 and r.json()["released_bytes"] > 0, r.text
        assert httpx.post(base + "/release_memory_occupation", headers=auth).status_code == 400
        r = httpx.post(base + "/resume_memory_occupation", headers=auth)
        assert r.status_code == 200 and r.json()["resumed_bytes"] > 0, r.text
        bad = httpx.post(base + "/init_weights_update_group", headers=auth, json={"master_address": "127.0.0.1"})
        assert bad.status_code == 400 and "master_port" in bad.text

        trainer, port = start_trainer(new_path)
        r = httpx.post(base + "/init_weights_update_group", headers=auth, timeout=120, json={
            "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": GROUP, "backend": "gloo"})
        assert r.status_code == 200, r.text
        names, dtypes, shapes = announced(new)
        r = httpx.post(base + "/update_weights_from_distributed", headers=auth, timeout=120, json={
            "names": names, "dtypes": [d.removeprefix("torch.") for d in dtypes], "shapes": shapes,
            "group_name": GROUP, "weight_version": "http-dist"})
        trainer.join(timeout=60)
        assert r.status_code == 200 and r.json()["weight_version"] == "http-dist", r.text
        r = httpx.post(base + "/destroy_weights_update_group", headers=auth, json={"group_name": GROUP})
        assert r.status_code == 200, r.text
        out = httpx.post(base + "/generate", json={"input_ids": PROMPTS[0], "sampling_params": GREEDY}).json()
        assert out["output_ids"] == hf_greedy(new, PROMPTS[:1], STEPS)[0]


def test_memory_saver_walks_any_pool_kind():
    """Both pool classes (per-head K/V and MLA's latent) release every buffer and
    get zeros of the same shapes back, seen through the lists others hold."""
    from radixserve.mem_cache.allocator import KVPool
    from radixserve.mem_cache.mla_pool import MLAKVPool
    from radixserve.model_executor.memory_saver import release_memory, resume_memory

    model = torch.nn.Linear(4, 4)
    for pool, expected in [(KVPool(33, 3, 2, 8, torch.float32, torch.device("cpu")), 2 * 3 * 33 * 2 * 8 * 4),
                           (MLAKVPool(33, 3, 16, 4, torch.bfloat16, torch.device("cpu")), 3 * 33 * 20 * 2)]:
        held = pool.k_buffers  # as an attention backend would read it
        shapes = [(b.shape, b.dtype) for b in held]
        for b in held:
            b.normal_()
        released = release_memory(model, pool, torch.device("cpu"))
        assert released.num_bytes == released.kv_bytes == expected
        assert all(b.numel() == 0 for b in held)
        resume_memory(pool, released)
        assert [(b.shape, b.dtype) for b in pool.k_buffers] == shapes
        assert all(b.eq(0).all() for b in held)
    assert model.weight.device.type == "cpu"  # on CPU the weights stay where they are
