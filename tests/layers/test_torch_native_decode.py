"""The torch-native decode's CPU shortcuts against attention written from the
definition: one request whose slots form a few runs of consecutive slots reads
its keys as slices of the pool (no gather), and a small bfloat16 batch on a CPU without bfloat16
units computes in float32; so do short extends (speculative verify steps); and
masked attention takes SDPA's fused kernel. These are the torch path's: the
CPU kernels (tests/layers/test_cpu_kernels.py) are switched off here."""

from __future__ import annotations

import contextlib

import pytest
import torch

from torch.nn.attention import SDPBackend, sdpa_kernel

from radixserve.layers.attention import torch_native
from radixserve.layers.attention.torch_native import TorchNativeAttnBackend
from tests.layers.test_cpu_kernels import kernels_off
from tests.layers.test_paged_attention import (
    DEVICE, HEAD_DIM, KV_HEADS, Pools, decode_batch, extend_batch, layer, reference_attention, rel, windowed_layer,
)

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU shortcuts")


@pytest.fixture(autouse=True)
def torch_path():
    """Decode without the CPU kernels, which would take it."""
    with kernels_off():
        yield


def decode(pools, lens, attn, q, k, v):
    backend = TorchNativeAttnBackend()
    fb = decode_batch(pools, lens, backend, len(lens))
    backend.init_forward_metadata(fb)
    return backend.forward(q, k, v, attn, fb), fb.attn_metadata


def inputs(attn, bs, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, heads * HEAD_DIM, generator=g).to(dtype)
            for heads in (attn.num_heads, KV_HEADS, KV_HEADS)]


def decoded_by_definition(pools, lens, attn, q):
    """Each request's decode query over its keys, one at a time from the definition."""
    return torch.cat([reference_attention(pools, r, n, q[i:i + 1], n - 1, attn)
                      for i, (r, n) in enumerate(zip(pools.rows, lens))])


def extend_errors(attn, cases, dtype, seed, context=contextlib.nullcontext):
    """One extend batch of (prefix, new tokens) cases through the backend (inside
    `context()`): its output and each request's relative error against the definition."""
    total = sum(e for _, e in cases)
    q, k, v = inputs(attn, total, dtype, seed)
    pools = Pools([p + e for p, e in cases], page_size=1, dtype=dtype)
    backend = TorchNativeAttnBackend()
    fb = extend_batch(pools, cases, backend, total)
    backend.init_forward_metadata(fb)
    with context():
        out = backend.forward(q, k, v, attn, fb)
    starts = [0] + torch.cumsum(torch.tensor([e for _, e in cases]), 0).tolist()
    return out, [rel(out[s:s + e], reference_attention(pools, row, p + e, q[s:s + e], p, attn))
                 for row, (p, e), s in zip(pools.rows, cases, starts)]


def moved(pools, n, order):
    """Pools holding the same keys and values as `pools` (one request of n
    tokens) with position i's KV in the slot `order(slots)[i]`."""
    out = Pools([n], page_size=1, dtype=torch.float32)
    slots = pools.table.req_to_token[pools.rows[0], :n]
    placed = order(slots)
    out.table.req_to_token[out.rows[0], :n] = placed
    for src, dst in zip(pools.kv.k_buffers + pools.kv.v_buffers, out.kv.k_buffers + out.kv.v_buffers):
        dst[placed] = src[slots]
    return out


@pytest.mark.parametrize("window,with_sinks", [(None, False), (8, True)])
def test_one_request_reads_runs_of_consecutive_slots_as_slices(window, with_sinks):
    n = 40
    attn = windowed_layer(4, window, with_sinks)
    q, k, v = inputs(attn, 1, torch.float32, 0)
    pools = Pools([n], page_size=1, dtype=torch.float32)
    out, meta = decode(pools, [n], attn, q, k, v)
    first = int(pools.table.req_to_token[pools.rows[0], 0])
    assert meta.slot_runs == [(first, first + n)]
    assert rel(out, reference_attention(pools, pools.rows[0], n, q, n - 1, attn)) < 1e-5

    # Two runs (a cached prefix and the request's own slots): read run by run, the same answer.
    split = moved(pools, n, lambda slots: torch.cat([slots[25:], slots[:25]]))
    out_runs, meta = decode(split, [n], attn, q, k, v)
    second = int(pools.table.req_to_token[pools.rows[0], 25])
    assert meta.slot_runs == [(second, second + n - 25), (first, first + 25)]
    assert rel(out_runs, out) < 1e-6

    # Slots out of order (more runs than MAX_SLOT_RUNS): the gather path, the same answer.
    out_gathered, meta = decode(moved(pools, n, lambda slots: slots.flip(0)), [n], attn, q, k, v)
    assert meta.slot_runs is None
    assert rel(out_gathered, out) < 1e-6


def test_a_batch_of_several_requests_gathers():
    lens = [9, 30]
    attn = layer(2)
    q, k, v = inputs(attn, 2, torch.float32, 1)
    pools = Pools(lens, page_size=1, dtype=torch.float32)
    out, meta = decode(pools, lens, attn, q, k, v)
    assert meta.slot_runs is None
    assert rel(out, decoded_by_definition(pools, lens, attn, q)) < 1e-5


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


@pytest.mark.parametrize("native", [True, False])
def test_verify_shaped_extends_attend_like_decode(monkeypatch, native):
    """A verify step's extends (the last token and up to 3 drafts on a cached
    prefix) attend in decode's dtype: float32 arithmetic for bfloat16 on a
    CPU without bfloat16 units, bfloat16 where it has them; one extend past
    SHORT_EXTEND keeps bfloat16. All against attention from the definition."""
    monkeypatch.setattr(torch_native, "cpu_has_native_bf16", lambda: native)
    cases = [(60, 4), (33, 1), (7, 3), (20, torch_native.SHORT_EXTEND + 1)]
    out, errors = extend_errors(layer(3), cases, torch.bfloat16, 3)
    assert out.dtype == torch.bfloat16
    # float32 arithmetic: the output's bfloat16 rounding (as decode above); bfloat16's own: about 3x that
    assert max(errors[:3]) < (1e-2 if native else 2.3e-3), errors
    assert errors[3] < 1e-2, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_attention_takes_the_fused_kernel(dtype):
    """Padded decode batches, extends on a cached prefix, a verify-sized extend
    and a first chunk all run with only SDPA's fused (flash) kernel allowed: a
    3-D call, which the fused kernel refuses, would fall to the unfused path,
    7-10x slower for a chunk on a cached prefix. Right against the definition."""
    attn = layer(4)
    lens = [50, 17, 33]
    q, k, v = inputs(attn, len(lens), dtype, 4)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        pools = Pools(lens, page_size=1, dtype=dtype)
        out, meta = decode(pools, lens, attn, q, k, v)
    assert not meta.unpadded
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(out, decoded_by_definition(pools, lens, attn, q)) < tolerance
    cases = [(60, 4), (0, 24), (30, 20)]
    _, errors = extend_errors(attn, cases, dtype, 5, lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))
    assert max(errors) < tolerance, errors
