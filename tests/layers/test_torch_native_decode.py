"""The torch-native decode's CPU shortcuts against attention written from the
definition: one request whose slots are consecutive reads its keys as a slice
of the pool (no gather), and a small bfloat16 batch on a CPU without bfloat16
units computes in float32."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers.attention import torch_native
from radixserve.layers.attention.torch_native import TorchNativeAttnBackend
from tests.layers.test_paged_attention import (
    DEVICE, HEAD_DIM, KV_HEADS, Pools, decode_batch, layer, reference_attention, rel, windowed_layer,
)

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU shortcuts")


def decode(pools, lens, attn, q, k, v):
    backend = TorchNativeAttnBackend()
    fb = decode_batch(pools, lens, backend, len(lens))
    backend.init_forward_metadata(fb)
    return backend.forward(q, k, v, attn, fb), fb.attn_metadata


def inputs(attn, bs, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, heads * HEAD_DIM, generator=g).to(dtype)
            for heads in (attn.num_heads, KV_HEADS, KV_HEADS)]


@pytest.mark.parametrize("window,with_sinks", [(None, False), (8, True)])
def test_one_request_reads_consecutive_slots_as_a_slice(window, with_sinks):
    n = 40
    attn = windowed_layer(4, window, with_sinks)
    q, k, v = inputs(attn, 1, torch.float32, 0)
    pools = Pools([n], page_size=1, dtype=torch.float32)
    out, meta = decode(pools, [n], attn, q, k, v)
    assert meta.consecutive_from == int(pools.table.req_to_token[pools.rows[0], 0])
    assert rel(out, reference_attention(pools, pools.rows[0], n, q, n - 1, attn)) < 1e-5

    # The same keys and values in slots out of order: the gather path, the same answer.
    shuffled = Pools([n], page_size=1, dtype=torch.float32)
    row, scattered = shuffled.rows[0], pools.table.req_to_token[pools.rows[0], :n].flip(0)
    shuffled.table.req_to_token[row, :n] = scattered
    for src, dst in zip(pools.kv.k_buffers + pools.kv.v_buffers, shuffled.kv.k_buffers + shuffled.kv.v_buffers):
        dst[scattered] = src[pools.table.req_to_token[pools.rows[0], :n]]
    out_gathered, meta = decode(shuffled, [n], attn, q, k, v)
    assert meta.consecutive_from is None
    assert rel(out_gathered, out) < 1e-6


def test_a_batch_of_several_requests_gathers():
    lens = [9, 30]
    attn = layer(2)
    q, k, v = inputs(attn, 2, torch.float32, 1)
    pools = Pools(lens, page_size=1, dtype=torch.float32)
    out, meta = decode(pools, lens, attn, q, k, v)
    assert meta.consecutive_from is None
    plain = torch.cat([reference_attention(pools, r, n, q[i:i + 1], n - 1, attn)
                       for i, (r, n) in enumerate(zip(pools.rows, lens))])
    assert rel(out, plain) < 1e-5


@pytest.mark.parametrize("bs", [1, 3])
def test_bfloat16_without_bf16_units_attends_in_float32(monkeypatch, bs):
    lens = [200, 150, 90][:bs]
    attn = layer(4)
    q, k, v = inputs(attn, bs, torch.bfloat16, 2)
    errors = {}
    for native in (True, False):
        monkeypatch.setattr(torch_native, "cpu_has_native_bf16", lambda native=native: native)
        pools = Pools(lens, page_size=1, dtype=torch.bfloat16)
        out, _ = decode(pools, lens, attn, q, k, v)
        assert out.dtype == torch.bfloat16
        plain = torch.cat([reference_attention(pools, r, n, q[i:i + 1], n - 1, attn)
                           for i, (r, n) in enumerate(zip(pools.rows, lens))])
        errors[native] = rel(out, plain)
        assert torch_native._decode_dtype(q, bs) == (torch.bfloat16 if native else torch.float32)
    # float32 arithmetic leaves little more than the output's bfloat16 rounding (1.5e-3 here;
    # bfloat16 arithmetic gave 3.2e-3 to 4.0e-3 on a CPU that converts element by element)
    assert errors[False] < 2.3e-3, errors
    big = torch.zeros(torch_native.FLOAT32_DECODE_MAX_BATCH + 1, 8, dtype=torch.bfloat16)
    assert torch_native._decode_dtype(big, big.shape[0]) == torch.bfloat16  # large batches: converting costs more
