"""Control messages: every reply names the request it answers; weight updates
asked while requests run are applied one after the other once those finish,
each answered to its own caller; a refused flush is refused to the flusher."""

from __future__ import annotations

import pickle

import pytest

from radixserve.managers import io_struct as io
from tests.managers.scheduler_harness import Harness, reference_output

CONTROL_MESSAGES = [
    io.GetServerInfoReq(), io.FlushCacheReq(), io.GetWeightsByNameReq("w", 3), io.GetWeightsByNameReq("nope"),
    io.PauseGenerationReq(), io.ContinueGenerationReq(), io.ReleaseMemoryOccupationReq(),
    io.ResumeMemoryOccupationReq(), io.DestroyWeightsUpdateGroupReq("no_group"),
    io.InitWeightsUpdateGroupReq("127.0.0.1", 1, rank_offset=0, world_size=1),
    io.UpdateWeightsFromDistributedReq(["x"], ["float32"], [[1]], group_name="no_group"),
    io.UpdateWeightsFromDiskReq("/good/ckpt"), io.UpdateWeightsFromDiskReq("/bad/ckpt"),
    io.UpdateWeightsFromTensorReq(pickle.dumps([])),
]


@pytest.mark.parametrize("msg", CONTROL_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_control_reply_names_its_request(msg):
    h = Harness()
    h.control(msg)
    h.step()
    (reply,) = h.replies(msg.request_id)
    assert isinstance(reply, io.ControlOut)
    assert [m for m in h.sent if isinstance(m, io.ControlOut) and m.request_id != msg.request_id] == []


def test_request_ids_are_unique_by_default():
    assert len({io.FlushCacheReq().request_id for _ in range(100)}) == 100


def test_concurrent_updates_are_serialised_and_answered_each_to_its_caller():
    h = Harness()
    h.submit("old", [4, 5, 6], 20, stream=True)
    h.run(until=lambda: len(h.tokens["old"]) >= 2)
    good, bad = io.UpdateWeightsFromDiskReq("/good/v2", weight_version="v2"), io.UpdateWeightsFromDiskReq("/bad")
    assert h.control(good) == [] and h.control(bad) == []  # both wait for the running request
    (flush,) = h.control(flush_req := io.FlushCacheReq())
    assert not flush.success and "refused" in flush.message and flush.request_id == flush_req.request_id
    h.submit("new", [7, 8], 5)  # queued: runs after the updates, on the new weights
    h.run()
    (good_reply,), (bad_reply,) = h.replies(good.request_id), h.replies(bad.request_id)
    assert good_reply.success and good_reply.weight_version == "v2"
    assert not bad_reply.success and "/bad" in bad_reply.message and bad_reply.weight_version == "v2"
    assert h.runner.weights == "/good/v2"
    assert h.versions == {"old": "default", "new": "v2"}
    assert h.tokens["old"] == reference_output([4, 5, 6], 20) and h.tokens["new"] == reference_output([7, 8], 5)
    (flush,) = h.control(flush_req := io.FlushCacheReq())
    assert flush.success


def test_update_with_abort_all_ends_running_requests_first():
    h = Harness()
    h.submit("victim", [4, 5, 6], 200, stream=True)
    h.run(until=lambda: len(h.tokens["victim"]) >= 2)
    update = io.UpdateWeightsFromDiskReq("/good/v3", abort_all_requests=True)
    h.control(update)
    h.step()
    (reply,) = h.replies(update.request_id)
    assert reply.success and h.finish["victim"]["type"] == "abort"


def test_release_is_refused_while_busy_and_nothing_runs_while_released():
    h = Harness()
    h.submit("a", [1, 2], 30, stream=True)
    h.run(until=lambda: len(h.tokens["a"]) >= 1)
    (refused,) = h.control(io.ReleaseMemoryOccupationReq())
    assert not refused.success and "running or waiting" in refused.message
    h.run()
    (released,) = h.control(io.ReleaseMemoryOccupationReq())
    assert released.success and h.scheduler.server_info()["paused"]
    h.submit("b", [3], 4)
    forwards = h.runner.num_forwards
    for _ in range(10):
        h.step()
    assert h.runner.num_forwards == forwards
    (resumed,) = h.control(io.ResumeMemoryOccupationReq())
    assert resumed.success
    h.run()
    assert h.tokens["b"] == reference_output([3], 4)
