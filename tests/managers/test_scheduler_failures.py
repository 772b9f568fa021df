"""A batch that raises inside the scheduler fails only its own requests (abort,
status 500), frees their KV, and the scheduler serves on; errors that leave
the device's state unknown still stop it."""

from __future__ import annotations

import pytest

from radixserve.managers import io_struct as io
from tests.managers.scheduler_harness import Harness, reference_output

POISON = 100  # a token only the doomed requests carry


def carries_poison(seqs) -> bool:
    return any(POISON in seq for seq in seqs)


def assert_failed_with_500(h: Harness, rid: str) -> None:
    reason = h.finish[rid]
    assert reason["type"] == "abort" and reason["status_code"] == 500, reason
    assert "injected failure" in reason["message"]


@pytest.mark.parametrize("overlap", [True, False])
def test_failed_prefill_fails_only_its_batch(overlap):
    h = Harness(disable_overlap_schedule=not overlap)
    h.runner.fail_when = lambda mode, seqs: mode.is_extend() and carries_poison(seqs)
    h.submit("running", [5, 6, 7], 30, stream=True)
    h.run(until=lambda: len(h.tokens["running"]) >= 2)
    h.submit("doomed", [8, POISON, 9], 10)
    h.submit("same_batch", [11, 12], 10)  # admitted with it: one batch, one fate
    h.run(until=lambda: "doomed" in h.finish)
    assert_failed_with_500(h, "doomed")
    assert_failed_with_500(h, "same_batch")
    h.submit("after", [13, 14, 15], 8)
    h.run()
    assert h.tokens["running"] == reference_output([5, 6, 7], 30)
    assert h.tokens["after"] == reference_output([13, 14, 15], 8)
    info = h.scheduler.server_info()
    assert info["num_failed_batches"] == 1 and info["kv_cache"]["in_use_tokens"] == 0


@pytest.mark.parametrize("overlap", [True, False])
def test_failed_decode_fails_the_running_batch_and_the_queue_carries_on(overlap):
    """A decode batch holds every running request: they fail together (their
    tokens so far were delivered); the requests waiting behind them then run."""
    h = Harness(max_running=2, disable_overlap_schedule=not overlap)
    h.runner.fail_when = lambda mode, seqs: mode.is_decode() and any(
        POISON in seq and len(seq) >= 8 for seq in seqs)
    h.submit("neighbour", [5, 6, 7], 30, stream=True)
    h.submit("doomed", [8, POISON, 9], 30, stream=True)
    h.submit("waiting", [21, 22], 6)
    h.run(until=lambda: "doomed" in h.finish)
    for rid, prompt in (("neighbour", [5, 6, 7]), ("doomed", [8, POISON, 9])):
        assert_failed_with_500(h, rid)
        assert h.tokens[rid] == reference_output(prompt, 30)[:len(h.tokens[rid])]
    h.run()
    assert h.tokens["waiting"] == reference_output([21, 22], 6)
    assert h.scheduler.kv_cache_stats()["in_use_tokens"] == 0


def test_failed_chunk_frees_the_half_prefilled_request():
    h = Harness(chunked_prefill_size=8, page_size=4)
    prompt = list(range(1, 30)) + [POISON] + list(range(31, 50))
    h.runner.fail_when = lambda mode, seqs: mode.is_extend() and carries_poison(seqs)
    h.submit("long", prompt, 5)
    h.submit("next", [3, 4], 5)
    h.run()
    assert_failed_with_500(h, "long")
    assert h.scheduler.admission.chunked_req is None
    assert h.tokens["next"] == reference_output([3, 4], 5)


def test_failure_while_preparing_decode():
    h = Harness()
    allocator = h.runner.pools.allocator
    real_alloc_decode, calls = allocator.alloc_decode, []

    def flaky_alloc_decode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure in alloc_decode")
        return real_alloc_decode(*args, **kwargs)

    allocator.alloc_decode = flaky_alloc_decode
    h.submit("a", [1, 2, 3], 10)
    h.run()
    assert_failed_with_500(h, "a")
    h.submit("b", [1, 2, 3], 10)
    h.run()
    assert h.tokens["b"] == reference_output([1, 2, 3], 10)


def test_a_device_error_still_stops_the_scheduler():
    h = Harness()

    def cuda_error(mode, seqs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    h.runner.fail_when = cuda_error
    h.submit("a", [1, 2], 3)
    with pytest.raises(RuntimeError, match="CUDA error"):
        h.run()


def test_bad_request_is_refused_without_touching_others():
    h = Harness(num_tokens=64)
    h.submit("ok", [1, 2], 4)
    h.submit("huge", list(range(1, 80)), 4)  # can never fit the 64-token pool
    h.run()
    assert h.finish["huge"]["status_code"] == 400 and "can never fit" in h.finish["huge"]["message"]
    assert h.tokens["ok"] == reference_output([1, 2], 4)
    h.scheduler.dispatch(io.TokenizedGenerateReqInput("bad", [1], sampling_params=None))
    h.collect()
    assert h.finish["bad"]["status_code"] == 500


@pytest.mark.parametrize("overlap", [True, False])
def test_failure_while_processing_results(overlap):
    """Processing a result raises (after the next batch was launched, with the
    overlap schedule): that result's requests fail, the next batch's others go on."""
    h = Harness(disable_overlap_schedule=not overlap)
    results = h.scheduler.results
    real_append = results.append_token

    def append_or_fail(req, row, token, host):
        if req.rid == "doomed" and len(req.output_ids) == 3:
            raise RuntimeError("injected failure in result processing")
        real_append(req, row, token, host)

    results.append_token = append_or_fail
    h.submit("doomed", [1, 2, 3], 10)
    h.submit("neighbour", [4, 5], 10)
    h.run(until=lambda: "doomed" in h.finish)
    h.submit("late", [6, 7, 8], 6)  # prefilled while the survivors decode
    h.run()
    for rid, prompt in (("doomed", [1, 2, 3]), ("neighbour", [4, 5])):  # one decode batch, one fate
        assert h.finish[rid]["status_code"] == 500 and "injected failure" in h.finish[rid]["message"]
        assert h.tokens[rid] == reference_output(prompt, 10)[:len(h.tokens[rid])]
    assert h.tokens["late"] == reference_output([6, 7, 8], 6)
    assert h.scheduler.kv_cache_stats()["in_use_tokens"] == 0
