"""The scheduler's policies without a model (see scheduler_harness): admission,
chunked prefill, retraction under memory pressure, aborts, priority and
pause, with the KV invariant checked after every step."""

from __future__ import annotations

import random

import pytest

from radixserve.managers import io_struct as io
from tests.managers.scheduler_harness import Harness, reference_output


def prompts(n: int, seed: int, low: int = 3, high: int = 40, shared: int = 0) -> list:
    """n random prompts; the first `shared` tokens are common to all (radix hits)."""
    rng = random.Random(seed)
    head = [rng.randrange(1, 100) for _ in range(shared)]
    return [head + [rng.randrange(1, 100) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def assert_all_match_reference(h: Harness, reqs: dict) -> None:
    for rid, (prompt, n) in reqs.items():
        assert h.finish[rid]["type"] == "length", (rid, h.finish[rid])
        assert h.tokens[rid] == reference_output(prompt, n), rid


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("page_size", [1, 4])
def test_batches_give_the_reference_outputs(overlap, page_size, mixed):
    h = Harness(page_size=page_size, disable_overlap_schedule=not overlap, enable_mixed_chunk=mixed,
                chunked_prefill_size=16)
    reqs = {f"r{i}": (p, 5 + i) for i, p in enumerate(prompts(12, seed=1, shared=9))}
    for rid, (prompt, n) in reqs.items():
        h.submit(rid, prompt, n)
    h.run()
    assert_all_match_reference(h, reqs)
    info = h.scheduler.server_info()
    assert (info["num_overlapped_batches"] > 0) == overlap
    assert (info["num_mixed_batches"] > 0) == mixed
    assert info["kv_cache"]["in_use_tokens"] == 0 and info["kv_cache"]["cached_tokens"] > 0


def test_max_running_requests_bounds_the_batch():
    h = Harness(max_running=3)
    reqs = {f"r{i}": (p, 6) for i, p in enumerate(prompts(7, seed=2))}
    for rid, (prompt, n) in reqs.items():
        h.submit(rid, prompt, n)
    most = 0
    for _ in range(500):
        h.step()
        most = max(most, len(h.scheduler.running))
        if h.scheduler.is_idle():
            break
    assert most == 3
    assert_all_match_reference(h, reqs)


def test_chunked_prefill_interleaves_with_decode():
    h = Harness(chunked_prefill_size=8, page_size=4)
    h.submit("short", [7, 8, 9], 100, stream=True)  # still decoding when the long prompt is done
    h.run(until=lambda: len(h.tokens["short"]) >= 2)
    long_prompt = prompts(1, seed=3, low=70, high=71)[0]
    h.submit("long", long_prompt, 5)
    chunks = 0
    while "long" not in h.finish:
        before = len(h.tokens["short"])
        h.step()
        if h.scheduler.admission.chunked_req is not None:
            chunks += 1
            h.step()  # after a chunk the running request decodes one step
            assert len(h.tokens["short"]) > before
    assert chunks >= 70 // 8
    h.run()
    assert_all_match_reference(h, {"short": ([7, 8, 9], 100), "long": (long_prompt, 5)})


def test_mixed_chunks_decode_in_every_forward():
    # With --enable-mixed-chunk every chunk's forward carries the running
    # request's decode step: one forward per chunk, and a token each time.
    h = Harness(chunked_prefill_size=8, page_size=4, enable_mixed_chunk=True)
    h.submit("short", [7, 8, 9], 100, stream=True)
    h.run(until=lambda: len(h.tokens["short"]) >= 2)
    long_prompt = prompts(1, seed=3, low=70, high=71)[0]
    h.submit("long", long_prompt, 5)
    chunks = 0
    while "long" not in h.finish:
        before, forwards = len(h.tokens["short"]), h.runner.num_forwards
        h.step()
        if h.scheduler.admission.chunked_req is not None:
            chunks += 1
            assert h.runner.num_forwards == forwards + 1 and len(h.tokens["short"]) > before
    assert chunks >= 70 // 8 and h.scheduler.num_mixed_batches >= chunks
    h.run()
    assert_all_match_reference(h, {"short": ([7, 8, 9], 100), "long": (long_prompt, 5)})


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("page_size", [1, 4])
def test_retraction_storm(page_size, mixed):
    """Many requests admitted optimistically into a tiny pool: decode must retract,
    again and again (with mixed chunks, while a prefill is planned in the same
    forward), and every request still gets exactly the reference output."""
    h = Harness(num_tokens=96, page_size=page_size, max_running=16, schedule_conservativeness=0.05,
                chunked_prefill_size=16, enable_mixed_chunk=mixed)
    reqs = {f"r{i}": (p, 20 + i % 7) for i, p in enumerate(prompts(24, seed=4, low=4, high=20, shared=4))}
    for rid, (prompt, n) in reqs.items():
        h.submit(rid, prompt, n)
    h.run(max_steps=20000)
    assert h.scheduler.running.num_retractions > 5
    assert (h.scheduler.num_mixed_batches > 0) == mixed
    assert_all_match_reference(h, reqs)
    assert h.scheduler.kv_cache_stats()["in_use_tokens"] == 0


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("overlap", [True, False])
def test_abort_storm(overlap, mixed):
    """Random aborts of waiting, running and half-prefilled (chunked) requests:
    each aborted one ends as aborted (or had already finished), the others get
    the reference output, and no KV is lost."""
    rng = random.Random(5)
    h = Harness(num_tokens=160, page_size=2, chunked_prefill_size=12, disable_overlap_schedule=not overlap,
                enable_mixed_chunk=mixed)
    reqs = {f"r{i}": (p, rng.randrange(3, 25)) for i, p in enumerate(prompts(40, seed=6, low=3, high=50, shared=6))}
    pending, aborted = list(reqs), set()
    for _ in range(20000):
        if pending and rng.random() < 0.5:
            rid = pending.pop(0)
            h.submit(rid, *reqs[rid], stream=rng.random() < 0.5)
        if rng.random() < 0.15:
            live = [r for r in reqs if r not in h.finish and r not in pending and r not in aborted]
            chunked = h.scheduler.admission.chunked_req
            victim = chunked.rid if chunked is not None and rng.random() < 0.5 else (rng.choice(live) if live else None)
            if victim is not None:
                aborted.add(victim)
                h.scheduler.dispatch(io.AbortReq(rid=victim))
        h.step()
        if not pending and h.scheduler.is_idle():
            break
    assert set(h.finish) == set(reqs)
    for rid, (prompt, n) in reqs.items():
        if rid in aborted and h.finish[rid]["type"] == "abort":
            assert h.tokens[rid] == reference_output(prompt, n)[:len(h.tokens[rid])]
        else:
            assert h.tokens[rid] == reference_output(prompt, n), rid
    assert sum(h.finish[r]["type"] == "abort" for r in aborted) >= 5
    assert h.scheduler.kv_cache_stats()["in_use_tokens"] == 0


def admission_order(policy: str) -> list:
    """One request at a time; the queue holds a request that shares a long prefix
    with a cached one, behind one that shares nothing."""
    h = Harness(max_running=1, schedule_policy=policy)
    cached = list(range(1, 40))
    h.submit("warm", cached, 2)
    h.run()
    h.submit("busy", [90, 91, 92], 3)  # runs first, while the others queue behind it
    h.step()
    h.submit("stranger", [70, 71, 72, 73], 3)
    h.submit("sharer", cached + [5, 6], 3)
    order = []
    for _ in range(200):
        h.step()
        order += [r for r in h.finish if r not in order]
        if h.scheduler.is_idle():
            break
    return order


def test_schedule_policy_orders_the_queue():
    assert admission_order("fcfs") == ["warm", "busy", "stranger", "sharer"]
    assert admission_order("lpm") == ["warm", "busy", "sharer", "stranger"]
    assert admission_order("dfs-weight")[-1] in ("sharer", "stranger")


def test_pause_in_place_then_continue_and_pause_abort():
    h = Harness()
    h.submit("a", [3, 4, 5], 40, stream=True)
    h.run(until=lambda: len(h.tokens["a"]) >= 3)
    (reply,) = h.control(msg := io.PauseGenerationReq("in_place"))
    assert reply.success and reply.request_id == msg.request_id
    h.submit("b", [6, 7], 5)
    frozen = (len(h.tokens["a"]), h.runner.num_forwards)
    for _ in range(20):
        h.step()
    assert (len(h.tokens["a"]), h.runner.num_forwards) == frozen  # nothing ran, KV kept
    assert h.scheduler.kv_cache_stats()["in_use_tokens"] > 0
    h.control(io.ContinueGenerationReq())
    h.run()
    assert h.tokens["a"] == reference_output([3, 4, 5], 40) and h.tokens["b"] == reference_output([6, 7], 5)

    h.submit("c", [8, 9], 40, stream=True)
    h.run(until=lambda: len(h.tokens["c"]) >= 2)
    (reply,) = h.control(io.PauseGenerationReq("abort"))
    h.collect()
    assert reply.success and h.finish["c"]["type"] == "abort"
    assert h.scheduler.kv_cache_stats()["in_use_tokens"] == 0
    (bad,) = h.control(io.PauseGenerationReq("sideways"))
    assert not bad.success and "mode" in bad.message


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("conservativeness", [1.0, 0.05])
def test_retracted_request_pins_its_cached_prefix_before_it_is_admitted(overlap, conservativeness, mixed):
    """A retracted request finds its own tokens in the radix cache; pinning
    them takes them out of what is evictable. Admission must count that
    before it lets the request back in; and when optimistic admission (low
    conservativeness) lets a chunked request take what a lone running request
    needs, the chunked one steps back rather than the running one being cut
    short. Every request gets all of its tokens."""
    h = Harness(num_tokens=112, chunked_prefill_size=16, disable_overlap_schedule=not overlap,
                schedule_conservativeness=conservativeness, enable_mixed_chunk=mixed)
    rng = random.Random(7)
    batch = {f"a{n}": ([rng.randrange(1, 100) for _ in range(n)], 24) for n in (3, 9, 17, 26, 33, 41)}
    for rid, (prompt, n) in batch.items():
        h.submit(rid, prompt, n)
    h.run(max_steps=20000)
    again = {"b33": (batch["a33"][0], 24), "b41": (batch["a41"][0], 24)}  # their prefixes are cached now
    for rid, (prompt, n) in again.items():
        h.submit(rid, prompt, n)
    h.run(max_steps=20000)
    assert h.scheduler.running.num_retractions > 0
    assert_all_match_reference(h, {**batch, **again})
