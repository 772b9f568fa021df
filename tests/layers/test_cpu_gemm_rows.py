"""CPU bfloat16 GEMMs run at a bucketed row count (layers/cpu_gemm_rows.py)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.layers import cpu_quantized_paths
from radixserve.layers.cpu_gemm_rows import (
    EXACT_ROWS, bucketed_row_count, cpu_bf16_linear, pad_keys, pad_queries, padded_key_count,
)
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


def test_a_bfloat16_lm_head_multiplies_bucketed_rows(monkeypatch):
    """The LM head's rows (a prefill's logprob positions, a decode batch past
    16) go to oneDNN at their bucket; the logits are float32, of the rows given."""
    from radixserve.layers.embedding import LMHead

    seen = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: seen.append(x.shape[0]) or linear(x, w, b))
    g = torch.Generator().manual_seed(2)
    head = LMHead(96, 64).bfloat16()
    torch.nn.init.normal_(head.weight, generator=g)
    rows = torch.randn(37, 64, generator=g).bfloat16()
    logits = head(rows)
    want = linear(rows.float(), head.weight.detach().float())
    assert logits.shape == (37, 96) and logits.dtype == torch.float32
    assert (logits - want).norm() / want.norm() < 1e-2
    assert seen == [40]


def test_padded_keys_are_zero_and_masked():
    """pad_keys: keys and values [..., L, d] to L's bucket with zeros, the mask
    False for them; nothing added for float32 (no per-shape kernels) or at a bucket."""
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 3, 37, 8, generator=g).bfloat16(), torch.randn(2, 3, 37, 8, generator=g).bfloat16()
    mask = torch.rand(2, 1, 1, 37, generator=g) > 0.3
    k, v, m = pad_keys(keys, values, mask)
    assert k.shape == v.shape == (2, 3, 40, 8) and m.shape == (2, 1, 1, 40)
    assert torch.equal(k[..., :37, :], keys) and torch.equal(v[..., :37, :], values) and torch.equal(m[..., :37], mask)
    assert not k[..., 37:, :].any() and not v[..., 37:, :].any() and not m[..., 37:].any()
    assert padded_key_count(37, keys) == 40 and padded_key_count(37, keys.float()) == 37
    assert pad_keys(keys.float(), values.float(), mask)[0].shape[-2] == 37
    assert pad_keys(k, v, m)[0] is k
    alone, no_values, visible = pad_keys(keys)  # keys only, none masked before: the padding is
    assert torch.equal(alone, k) and no_values is None and visible.tolist() == [True] * 37 + [False] * 3


def test_padded_queries_see_every_key():
    """pad_queries: q [..., Q, d] to Q's bucket with zero rows whose mask rows
    see every key (a row that sees none would be a NaN softmax); float32 untouched."""
    q = torch.randn(4, 17, 8).bfloat16()
    mask = torch.rand(17, 30) > 0.5
    padded, seen = pad_queries(q, mask)
    assert padded.shape == (4, 18, 8) and seen.shape == (18, 30)
    assert torch.equal(padded[:, :17], q) and not padded[:, 17:].any()
    assert torch.equal(seen[:17], mask) and seen[17:].all()
    assert pad_queries(q.float(), mask)[0].shape == (4, 17, 8)
