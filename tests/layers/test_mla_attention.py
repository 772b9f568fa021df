"""The Triton MLA kernels (compiled on CUDA, interpreted on the CPU) against plain float64
attention: 20 heads (two head blocks, the second partial), latent 40 and rope
24 (neither a power of two), a paged cache with shuffled slots, requests of
unlike lengths (one a single token), several KV splits."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers.attention.mla_triton import (
    mla_decode_attention,
    mla_extend_expanded_attention,
    mla_extend_latent_attention,
)

HEADS, LATENT, ROPE, NOPE, V = 20, 40, 24, 12, 28
SCALE = 0.3
SEQ_LENS = [1, 37, 70]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Seeded on the CPU (the same values on either device), placed on DEVICE."""
    return torch.randn(*shape, generator=generator).to(DEVICE)


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, device=DEVICE)


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_pos: int) -> torch.Tensor:
    """q [n, H, dk] at positions first_pos.., keys [L, H or 1, dk], values [L, H or 1, dv] -> [n, H, dv]."""
    q, keys, values = q.double(), keys.double().expand(-1, HEADS, -1), values.double().expand(-1, HEADS, -1)
    scores = torch.einsum("qhd,khd->hqk", q, keys) * SCALE
    visible = torch.arange(keys.shape[0], device=q.device)[None, :] <= \
        (first_pos + torch.arange(q.shape[0], device=q.device))[:, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values)


@pytest.fixture(scope="module")
def paged_cache():
    """(kv buffer [slots, 1, LATENT + ROPE], req_to_token, rows): each request's
    positions map to scattered slots."""
    g = torch.Generator().manual_seed(0)
    num_slots = sum(SEQ_LENS) + 1
    kv = randn(num_slots, 1, LATENT + ROPE, generator=g)
    table = torch.zeros(4, 80, dtype=torch.int64)
    slots = torch.randperm(num_slots - 1, generator=g) + 1
    rows, start = [2, 0, 3], 0
    for row, n in zip(rows, SEQ_LENS):
        table[row, :n] = slots[start:start + n]
        start += n
    return kv, table.to(DEVICE), tensor(rows)


def test_decode_matches_reference(paged_cache):
    kv, table, rows = paged_cache
    g = torch.Generator().manual_seed(1)
    q_latent = randn(len(SEQ_LENS), HEADS, LATENT, generator=g)
    q_pe = randn(len(SEQ_LENS), HEADS + 3, ROPE, generator=g)[:, :HEADS]  # strided, as the model's views
    out = torch.empty(len(SEQ_LENS), HEADS, LATENT, device=DEVICE)
    mla_decode_attention(q_latent, q_pe, kv, out, table, rows, tensor(SEQ_LENS), SCALE, num_splits=4)
    for i, (row, n) in enumerate(zip(rows.tolist(), SEQ_LENS)):
        keys = kv[table[row, :n]]
        q = torch.cat([q_latent[i:i + 1], q_pe[i:i + 1]], dim=-1)
        ref = reference(q, keys, keys[..., :LATENT], n - 1)
        torch.testing.assert_close(out[i:i + 1].double(), ref, rtol=1e-5, atol=1e-5)


def test_absorbed_extend_matches_reference(paged_cache):
    kv, table, rows = paged_cache
    prefixes = [0, 20, 5]
    extends = [n - p for n, p in zip(SEQ_LENS, prefixes)]
    total = sum(extends)
    g = torch.Generator().manual_seed(2)
    q_latent, q_pe = randn(total, HEADS, LATENT, generator=g), randn(total, HEADS, ROPE, generator=g)
    out = torch.empty(total, HEADS, LATENT, device=DEVICE)
    starts = tensor([0, extends[0], extends[0] + extends[1]])
    mla_extend_latent_attention(q_latent, q_pe, kv, out, table, rows, tensor(prefixes), tensor(extends),
                                starts, max(extends), SCALE)
    for i, (row, n, p) in enumerate(zip(rows.tolist(), SEQ_LENS, prefixes)):
        keys = kv[table[row, :n]]
        s, e = starts[i].item(), starts[i].item() + extends[i]
        ref = reference(torch.cat([q_latent[s:e], q_pe[s:e]], dim=-1), keys, keys[..., :LATENT], p)
        torch.testing.assert_close(out[s:e].double(), ref, rtol=1e-5, atol=1e-5)


def test_expanded_extend_matches_reference():
    """Packed per-request keys (prefix and new), k_pe shared by the heads."""
    prefixes, extends = [0, 20, 5], [1, 17, 65]
    seqs = [p + e for p, e in zip(prefixes, extends)]
    g = torch.Generator().manual_seed(3)
    k_nope, k_pe = randn(sum(seqs), HEADS, NOPE, generator=g), randn(sum(seqs), ROPE, generator=g)
    v = randn(sum(seqs), HEADS, V, generator=g)
    q_nope = randn(sum(extends), HEADS, NOPE, generator=g)
    q_pe = randn(sum(extends), HEADS, ROPE, generator=g)
    out = torch.empty(sum(extends), HEADS, V, device=DEVICE)
    q_starts, kv_starts = tensor([0, 1, 18]), tensor([0, 1, 38])
    mla_extend_expanded_attention(q_nope, q_pe, k_nope, k_pe, v, out, tensor(prefixes), tensor(extends),
                                  q_starts, kv_starts, max(extends), SCALE)
    for i, (p, e, n) in enumerate(zip(prefixes, extends, seqs)):
        ks, qs = kv_starts[i].item(), q_starts[i].item()
        keys = torch.cat([k_nope[ks:ks + n], k_pe[ks:ks + n, None].expand(-1, HEADS, -1)], dim=-1)
        q = torch.cat([q_nope[qs:qs + e], q_pe[qs:qs + e]], dim=-1)
        torch.testing.assert_close(out[qs:qs + e].double(), reference(q, keys, v[ks:ks + n], p), rtol=1e-5, atol=1e-5)


def test_mla_is_its_own_backend_interface():
    """A backend for ordinary attention implements three methods and no MLA hook;
    an MLA backend must provide both forms of MLA attention."""
    from radixserve.layers.attention.base import AttentionBackend
    from radixserve.layers.attention.mla_backend import MLABackend
    from radixserve.layers.attention.torch_native import TorchNativeAttnBackend
    from radixserve.layers.attention.triton_attn_backend import TritonAttnBackend

    class OrdinaryOnly(AttentionBackend):
        def init_forward_metadata(self, forward_batch):
            pass

        def forward_extend(self, q, k, v, layer, forward_batch, cached=False):
            return q

        def forward_decode(self, q, k, v, layer, forward_batch, cached=False):
            return q

    assert not isinstance(OrdinaryOnly(), MLABackend)

    class LatentOnly(OrdinaryOnly, MLABackend):
        def mla_attend_latent(self, q_latent, q_pe, layer, forward_batch):
            return q_latent

    with pytest.raises(TypeError, match="mla_attend_expanded"):
        LatentOnly()
    assert issubclass(TorchNativeAttnBackend, MLABackend) and issubclass(TritonAttnBackend, MLABackend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_latent_attention_matches_reference(paged_cache, dtype):
    """The torch_native backend's absorbed attention (latent_attention_torch),
    decode and extend, against float64 attention from the definition. In
    bfloat16 on the CPU its keys are padded with zeros to their bucket (37 and
    70 keys run as 40 and 72, masked out)."""
    from types import SimpleNamespace

    from radixserve.layers.attention.mla import latent_attention_torch
    from radixserve.model_executor.forward_batch import ForwardMode

    kv, table, rows = paged_cache
    layer = SimpleNamespace(layer_id=0, kv_lora_rank=LATENT, scaling=SCALE)
    pools = dict(kv_pool=SimpleNamespace(latent_buffers=[kv.to(dtype)]),
                 req_to_token_pool=SimpleNamespace(req_to_token=table), req_pool_indices=rows)
    bound = 1e-6 if dtype == torch.float32 else 1e-2  # relative L2: bfloat16 inputs and arithmetic

    def check(out, ref):
        assert ((out.double() - ref).norm() / ref.norm()).item() < bound
    g = torch.Generator().manual_seed(5)
    q_latent, q_pe = randn(len(SEQ_LENS), HEADS, LATENT, generator=g), randn(len(SEQ_LENS), HEADS, ROPE, generator=g)
    decode = SimpleNamespace(forward_mode=ForwardMode.DECODE, seq_lens_cpu=SEQ_LENS, seq_lens=tensor(SEQ_LENS), **pools)
    out = latent_attention_torch(q_latent.to(dtype), q_pe.to(dtype), layer, decode)
    for i, (row, n) in enumerate(zip(rows.tolist(), SEQ_LENS)):
        keys = kv[table[row, :n]].to(dtype)
        q = torch.cat([q_latent[i:i + 1], q_pe[i:i + 1]], dim=-1).to(dtype)
        check(out[i:i + 1], reference(q, keys, keys[..., :LATENT], n - 1))
    prefixes = [0, 20, 5]
    extends = [n - p for n, p in zip(SEQ_LENS, prefixes)]
    q_latent, q_pe = randn(sum(extends), HEADS, LATENT, generator=g), randn(sum(extends), HEADS, ROPE, generator=g)
    extend = SimpleNamespace(forward_mode=ForwardMode.EXTEND, extend_prefix_lens_cpu=prefixes,
                             extend_seq_lens_cpu=extends, **pools)
    out = latent_attention_torch(q_latent.to(dtype), q_pe.to(dtype), layer, extend)
    start = 0
    for row, n, p, e in zip(rows.tolist(), SEQ_LENS, prefixes, extends):
        keys = kv[table[row, :n]].to(dtype)
        q = torch.cat([q_latent[start:start + e], q_pe[start:start + e]], dim=-1).to(dtype)
        check(out[start:start + e], reference(q, keys, keys[..., :LATENT], p))
        start += e
