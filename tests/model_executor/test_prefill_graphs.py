"""Short prefills replayed from CUDA graphs (prefill_graph_runner.py).

A request's extend padded up to a token bucket gives the next-token logits
transformers gives at its last real token, and changes no KV slot but the
reserved slot 0 beyond what the eager forward writes. On the CPU the buckets
run eagerly on the runner's static buffers (Triton's interpreter runs the
attention kernels); on CUDA the runner's own captured graphs replay.
"""

from __future__ import annotations

from typing import List

import pytest
import torch

from radixserve.managers.schedule_batch import set_extend_lens
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode
from radixserve.model_executor.prefill_graph_runner import PrefillGraphRunner, prefill_token_buckets
from radixserve.server_args import ServerArgs
from tests.conftest import load_hf_model

MAX_TOKENS = 40
# (cached tokens, new tokens): the smallest bucket, a bucket's exact size, one
# past it, an extend on a cached prefix, and the largest bucket (not a power of two).
CASES = [(0, 1), (0, 16), (0, 17), (23, 9), (5, 40)]


def test_buckets_pad_by_at_most_half_from_64_on():
    assert prefill_token_buckets(512) == [16, 32, 64, 96, 128, 192, 256, 384, 512]
    assert prefill_token_buckets(40) == [16, 32, 40]
    assert prefill_token_buckets(10) == [10]
    assert prefill_token_buckets(0) == []
    buckets = prefill_token_buckets(5000)
    assert buckets[-1] == 5000 and buckets == sorted(set(buckets))
    assert all(b <= a * 3 // 2 for a, b in zip(buckets, buckets[1:]) if a >= 64)


def extend_batch(runner, row: int, cached: int, ids: List[int]) -> ForwardBatch:
    """One request's extend of ids after `cached` tokens already in its row's KV."""
    dev, pools = runner.device, runner.pools
    n = len(ids)
    fb = ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=1,
        input_ids=torch.tensor(ids, device=dev), positions=torch.arange(cached, cached + n, device=dev),
        req_pool_indices=torch.tensor([row], device=dev), seq_lens=torch.tensor([cached + n], device=dev),
        out_cache_loc=pools.req_to_token_pool.req_to_token[row, cached:cached + n].clone(),
        seq_lens_cpu=[cached + n], req_to_token_pool=pools.req_to_token_pool, kv_pool=pools.kv_pool,
        logits_indices=torch.tensor([n - 1], device=dev), last_logit_rows=torch.tensor([0], device=dev),
    )
    set_extend_lens(fb, [cached], [n], dev)
    return fb


def kv_snapshot(runner) -> List[torch.Tensor]:
    pool = runner.pools.kv_pool
    return [b.clone() for b in pool.k_buffers + pool.v_buffers]


def check_cases(runner, graphs: PrefillGraphRunner, hf, tol: float) -> None:
    pools = runner.pools
    g = torch.Generator().manual_seed(5)
    for cached, new in CASES:
        ids = torch.randint(10, 1000, (cached + new,), generator=g).tolist()
        row = pools.req_to_token_pool.alloc()
        slots = pools.allocator.alloc_extend([0], [cached + new], [0])
        pools.req_to_token_pool.req_to_token[row, :cached + new] = slots
        if cached:
            runner.forward_eager(extend_batch(runner, row, 0, ids[:cached]))
        batch = extend_batch(runner, row, cached, ids[cached:])
        assert graphs.can_run(batch)
        eager = runner.forward_eager(batch).next_token_logits.clone()
        before = kv_snapshot(runner)
        replayed = graphs.replay(extend_batch(runner, row, cached, ids[cached:])).next_token_logits.clone()
        with torch.no_grad():
            expected = hf(torch.tensor([ids], device=runner.device)).logits[0, -1].float()
        for ours in (eager[0], replayed[0]):
            assert ((ours - expected).norm() / expected.norm()).item() < tol, (cached, new)
        # Padding wrote slot 0 only: every other slot holds what the eager forward wrote.
        for b, a in zip(before, kv_snapshot(runner)):
            torch.testing.assert_close(a[1:], b[1:], rtol=tol, atol=tol)
        pools.allocator.free(slots)
        pools.req_to_token_pool.free(row)


def runner_for(path, device: str, **kwargs):
    from radixserve.model_executor.model_runner import ModelRunner

    return ModelRunner(ServerArgs(model_path=str(path), device=device, dtype="float32", attention_backend="triton",
                                  max_total_tokens=1024, max_running_requests=4,
                                  prefill_cuda_graph_max_tokens=MAX_TOKENS, **kwargs))


# The CPU runs Triton's kernels in its interpreter only where there is no CUDA
# (tests/conftest.py); on a GPU machine the CUDA test below covers the same cases.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's CPU interpreter is off where CUDA is")


@cpu_only
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_padded_buckets_match_transformers_on_cpu(arch, tiny_model_factory):
    path = tiny_model_factory(arch)
    runner = runner_for(path, "cpu")
    assert runner.graph_runners == []  # no CUDA: prefills run eagerly in service
    graphs = PrefillGraphRunner(runner, MAX_TOKENS, capture=False)
    assert sorted(graphs.graphs) == [16, 32, 40]
    check_cases(runner, graphs, load_hf_model(path), tol=1e-5)


@cpu_only
def test_only_a_lone_plain_extend_takes_a_graph(tiny_model_factory):
    runner = runner_for(tiny_model_factory("llama"), "cpu")
    graphs = PrefillGraphRunner(runner, MAX_TOKENS, capture=False)
    pools = runner.pools
    row = pools.req_to_token_pool.alloc()
    pools.req_to_token_pool.req_to_token[row, :MAX_TOKENS + 1] = pools.allocator.alloc_extend([0], [MAX_TOKENS + 1],
                                                                                               [0])
    plain = extend_batch(runner, row, 0, list(range(10, 20)))
    assert graphs.can_run(plain)
    too_long = extend_batch(runner, row, 0, list(range(10, 11 + MAX_TOKENS)))
    input_logprobs = extend_batch(runner, row, 0, list(range(10, 20)))
    input_logprobs.logits_indices = torch.arange(10)
    decode = extend_batch(runner, row, 0, [10])
    decode.forward_mode = ForwardMode.DECODE
    hidden_out = extend_batch(runner, row, 0, list(range(10, 20)))
    hidden_out.return_hidden = True
    for batch in (too_long, input_logprobs, decode, hidden_out):
        assert not graphs.can_run(batch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_captured_graphs_match_transformers_on_cuda(arch, tiny_model_factory):
    path = tiny_model_factory(arch)
    runner = runner_for(path, "cuda")
    graphs = [g for g in runner.graph_runners if isinstance(g, PrefillGraphRunner)]
    assert len(graphs) == 1 and sorted(graphs[0].graphs) == [16, 32, 40]
    hf = load_hf_model(path).cuda()
    # (TF32 is off for float32 matmuls by default, so both sides compute in float32.)
    check_cases(runner, graphs[0], hf, tol=1e-4)
