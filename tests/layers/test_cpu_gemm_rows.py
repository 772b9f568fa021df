"""CPU bfloat16 GEMMs run at a bucketed row count (layers/cpu_gemm_rows.py)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.layers import cpu_quantized_paths
from radixserve.layers.cpu_gemm_rows import EXACT_ROWS, bucketed_row_count, cpu_bf16_linear
from radixserve.layers.linear import Linear


@given(st.integers(1, 1 << 20))
@settings(max_examples=300, deadline=None)
def test_a_bucket_holds_the_rows_with_at_most_an_eighth_more(count):
    bucket = bucketed_row_count(count)
    assert count <= bucket <= count * 1.125
    assert bucketed_row_count(bucket) == bucket  # a bucket is its own bucket
    if count <= EXACT_ROWS:
        assert bucket == count


def test_a_prefill_chunk_meets_few_row_counts():
    """Every count up to 8,192 rows falls in one of 88 buckets (16 exact, then 8 per doubling)."""
    buckets = {bucketed_row_count(n) for n in range(1, 8193)}
    assert len(buckets) == 16 + 9 * 8
    assert all(bucketed_row_count(a) <= bucketed_row_count(a + 1) for a in range(1, 8192))


def test_padded_rows_give_the_unpadded_product():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 64, generator=g).bfloat16(), torch.randn(48, generator=g).bfloat16()
    for count in (1, 17, 100, 300):
        rows = torch.randn(count, 64, generator=g).bfloat16()
        out = cpu_bf16_linear(rows, weight, bias)
        want = torch.nn.functional.linear(rows.float(), weight.float(), bias.float())
        assert out.shape == (count, 48) and out.dtype == torch.bfloat16
        assert (out.float() - want).norm() / want.norm() < 1e-2


def test_a_linear_and_a_prefill_gemm_return_only_their_rows():
    g = torch.Generator().manual_seed(1)
    layer = Linear(64, 32).bfloat16()
    torch.nn.init.normal_(layer.weight, generator=g)
    rows = torch.randn(37, 64, generator=g).bfloat16()  # bucket 40
    assert layer(rows).shape == (37, 32)
    quantized = torch.zeros(32, 32, dtype=torch.uint8)  # stands for a packed weight
    out = cpu_quantized_paths.prefill_gemm(rows, quantized, lambda: layer.weight.detach().float())
    want = torch.nn.functional.linear(rows.float(), layer.weight.detach().float())
    assert out.shape == (37, 32) and (out.float() - want).norm() / want.norm() < 1e-2
