"""The values the scheduler ranks agree on: two real gloo ranks (spawned
processes on loopback), each reporting what every helper gave it."""

from __future__ import annotations

import multiprocessing as mp
import queue

import torch

from radixserve.distributed import rank_sync
from tests.server_utils import free_port

MESSAGES = [{"rid": "a", "ids": [1, 2, 3]}, "abort"]


def rank_main(rank: int, port: int, results: mp.Queue) -> None:
    from radixserve.distributed import ParallelConfig, destroy_distributed, init_distributed

    init_distributed(ParallelConfig(tp_size=2, tp_rank=rank), torch.device("cpu"), f"tcp://127.0.0.1:{port}", 60)
    first = rank == 0
    out = {
        "empty": rank_sync.broadcast_messages([] if first else None),
        "messages": rank_sync.broadcast_messages(MESSAGES if first else None),
        "min": rank_sync.min_over_ranks(100 - 30 * rank),
        "gathered": rank_sync.gather_objects({"rank": rank}),
        "ids": rank_sync.broadcast_tensor_from_first(torch.tensor([10 * rank + 1, 10 * rank + 2])).tolist(),
        "object": rank_sync.broadcast_from_first(f"from rank {rank}"),
    }
    destroy_distributed()
    results.put((rank, out))


def test_two_ranks_agree_on_rank_0_values():
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=rank_main, args=(r, port, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=120) for _ in procs)  # the timeout only guards against a hang
    except queue.Empty:
        raise AssertionError(f"a rank did not report; exit codes {[p.exitcode for p in procs]}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    expected = {"empty": [], "messages": MESSAGES, "min": 70, "gathered": [{"rank": 0}, {"rank": 1}],
                "ids": [1, 2], "object": "from rank 0"}
    assert got == {0: expected, 1: expected}


def test_one_rank_gets_its_own_values_back():
    assert rank_sync.broadcast_messages(MESSAGES) == MESSAGES
    assert rank_sync.broadcast_messages([]) == []
    assert rank_sync.min_over_ranks(5) == 5
    assert rank_sync.gather_objects("x") == ["x"]
    assert rank_sync.broadcast_tensor_from_first(torch.tensor([3])).tolist() == [3]
