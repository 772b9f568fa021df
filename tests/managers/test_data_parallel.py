"""The data-parallel dispatcher and reply folding, without processes: which
replica each load-balance method picks, routed requests, load accounting,
and one answer from every replica's reply."""

from __future__ import annotations

import pytest

from radixserve.entrypoints.launch_server import parse_args
from radixserve.managers import io_struct as io
from radixserve.managers.data_parallel import ReplicaDispatcher, merge_replies, merge_server_info
from radixserve.managers.generate_input import GenerateReqInput
from radixserve.managers.native_fields import implemented_fields
from radixserve.managers.validation import FieldError


def test_flags_and_their_checks():
    assert parse_args(["--dp", "2"]).dp_size == 2
    assert parse_args(["--data-parallel-size", "3"]).dp_size == 3
    assert parse_args(["--dp-size", "2", "--load-balance-method", "total_tokens"]).load_balance_method == "total_tokens"
    with pytest.raises(ValueError, match="dp_size"):
        parse_args(["--dp-size", "0"])
    with pytest.raises(ValueError, match="disaggregation"):
        parse_args(["--load-balance-method", "follow_bootstrap_room"])
    with pytest.raises(ValueError, match="load_balance_method"):
        parse_args(["--load-balance-method", "shortest_queue"])
    with pytest.raises(ValueError, match="nnodes"):
        parse_args(["--dp-size", "2", "--tp-size", "2", "--nnodes", "2", "--dist-init-addr", "127.0.0.1:5000"])


def test_round_robin_cycles_and_routed_requests_do_not_advance_it():
    d = ReplicaDispatcher(3, "auto")  # auto is round robin without disaggregation
    assert [d.assign(f"r{i}", 10) for i in range(4)] == [0, 1, 2, 0]
    assert d.assign("pinned", 10, routed_dp_rank=2) == 2
    assert d.assign("r4", 10) == 1
    assert [load.requests for load in d.loads] == [2, 2, 2]


def test_total_requests_picks_the_replica_with_fewest_in_flight():
    d = ReplicaDispatcher(2, "total_requests")
    assert [d.assign(rid, 5) for rid in ("a", "b", "c")] == [0, 1, 0]
    d.on_finished("a")
    d.on_finished("c")
    assert d.assign("d", 5) == 0  # replica 0 is empty again, replica 1 still serves b
    d.on_finished("unknown")  # a finish nobody counted changes nothing
    assert [load.requests for load in d.loads] == [1, 1]


def test_total_tokens_counts_prompts_and_generated_tokens():
    d = ReplicaDispatcher(2, "total_tokens")
    assert d.assign("long", 100) == 0
    assert d.assign("short", 10) == 1
    assert d.assign("next", 10) == 1  # 10 < 100
    d.on_generated("next", 90)  # replica 1 now holds 10 + 10 + 90 tokens
    assert d.assign("after", 1) == 0
    for rid in ("long", "short", "next", "after"):
        d.on_finished(rid)
    assert [(load.requests, load.tokens) for load in d.loads] == [(0, 0), (0, 0)]


def test_total_tokens_breaks_ties_by_requests():
    d = ReplicaDispatcher(2, "total_tokens")
    d.assign("a", 0)
    assert d.assign("b", 0) == 1


def test_routed_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match="routed_dp_rank"):
        ReplicaDispatcher(2).assign("x", 1, routed_dp_rank=2)
    with pytest.raises(FieldError) as e:
        GenerateReqInput(prompt="hi", routed_dp_rank=3).split(dp_size=2)
    assert e.value.field == "routed_dp_rank"
    assert GenerateReqInput(prompt="hi", routed_dp_rank=1).split(dp_size=2)[0].routed_dp_rank == 1


def test_native_body_routes_by_either_name():
    assert implemented_fields({"text": "x", "data_parallel_rank": 1}, dp_size=2)["routed_dp_rank"] == 1
    assert implemented_fields({"text": "x", "routed_dp_rank": 0}, dp_size=2)["routed_dp_rank"] == 0
    assert implemented_fields({"text": "x"}, dp_size=2)["routed_dp_rank"] is None
    for body in ({"routed_dp_rank": 2}, {"data_parallel_rank": True},
                 {"routed_dp_rank": 0, "data_parallel_rank": 1}):
        with pytest.raises(FieldError) as e:
            implemented_fields({"text": "x", **body}, dp_size=2)
        assert e.value.field in body


def test_first_failure_names_its_replica():
    ok = io.UpdateWeightsOut(True, "", "v2", request_id="u", dp_rank=0)
    bad = io.UpdateWeightsOut(False, "no such file", "v1", request_id="u", dp_rank=1)
    merged = merge_replies([ok, bad])
    assert not merged.success and merged.message == "dp rank 1: no such file"
    assert merge_replies([ok, ok]) is ok
    weights_error = merge_replies([io.GetWeightsByNameOut(values=[1.0]), io.GetWeightsByNameOut(error="unknown")])
    assert weights_error.error == "dp rank 1: unknown"


def test_memory_bytes_add_up():
    replies = [io.MemoryOccupationOut(True, "", 100, dp_rank=0), io.MemoryOccupationOut(True, "", 150, dp_rank=1)]
    assert merge_replies(replies).num_bytes == 250


def test_server_info_sums_counters_and_lists_replicas():
    def state(rank: int, running: int, free: int) -> dict:
        return {"dp_rank": rank, "max_total_num_tokens": 100, "num_running_reqs": running, "num_waiting_reqs": 1,
                "paused": False, "kv_cache": {"total_tokens": 100, "free_tokens": free, "in_use_tokens": 100 - free,
                                              "cached_tokens": 0}}

    merged = merge_server_info([state(0, 2, 60), state(1, 3, 90)])
    assert merged["num_running_reqs"] == 5 and merged["num_waiting_reqs"] == 2
    assert merged["kv_cache"] == {"total_tokens": 200, "free_tokens": 150, "in_use_tokens": 50, "cached_tokens": 0}
    assert merged["max_total_num_tokens"] == 100  # per replica, as SGLang reports it
    assert [s["dp_rank"] for s in merged["internal_states"]] == [0, 1]
