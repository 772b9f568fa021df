"""The fused Triton kernels (RMSNorm with residual, SiLU-and-mul, rotary)
against the torch code they replace. On CPU they run under TRITON_INTERPRET=1
(set in conftest); on a GPU at real sizes."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers import fused_kernels as fk
from radixserve.layers.activation import SiluAndMul
from radixserve.layers.layernorm import RMSNorm
from radixserve.layers.rotary import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# With CUDA every test runs at real sizes: `pytest -m gpu` selects them there.
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []
# (dtype, tolerance): a kernel may round differently from torch by one ulp of the dtype
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]
SIZES = [(5, 96), (1, 64)] if DEVICE == "cpu" else [(1, 4096), (300, 4096), (7, 1024)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("rows,hidden", SIZES)
def test_rms_norm(dtype, tol, rows, hidden):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(hidden, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=g) + 0.5)
    norm = norm.to(DEVICE, dtype)
    x = torch.randn(rows, hidden, generator=g).to(DEVICE, dtype)
    res = torch.randn(rows, hidden, generator=g).to(DEVICE, dtype)
    ref_out, ref_res = RMSNorm.forward(norm.cpu(), x.cpu(), res.cpu())  # the torch path
    out, new_res = fk.rms_norm(x, norm.weight.to(DEVICE), norm.eps, res)
    assert rel(out.cpu(), ref_out) < tol
    assert rel(new_res.cpu(), ref_res) < tol
    plain = fk.rms_norm(x, norm.weight.to(DEVICE), norm.eps)
    assert rel(plain.cpu(), RMSNorm.forward(norm.cpu(), x.cpu())) < tol


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("rows,hidden", SIZES)
def test_silu_and_mul(dtype, tol, rows, hidden):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(rows, 2 * hidden, generator=g) * 3).to(DEVICE, dtype)
    assert rel(fk.silu_and_mul(x).cpu(), SiluAndMul()(x.cpu())) < tol


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("head_norms", [False, True])
def test_rotary_on_strided_views(dtype, tol, head_norms):
    """q and k as column slices of one fused qkv output, as the models pass them;
    with head_norms, each head RMS-normalised first in the same kernel (Qwen3)."""
    head_dim, heads, kv_heads, tokens = (16, 4, 2, 6) if DEVICE == "cpu" else (128, 32, 8, 300)
    g = torch.Generator().manual_seed(2)
    rope = RotaryEmbedding(head_dim, 512, {"rope_type": "default", "rope_theta": 10000.0})
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g) * 10).to(DEVICE, dtype)
    q, k = qkv[:, :heads * head_dim], qkv[:, heads * head_dim:(heads + kv_heads) * head_dim]
    positions = torch.randint(0, 512, (tokens,), generator=g)
    norms = [None, None]
    if head_norms:
        norms = [RMSNorm(head_dim, eps=1e-6).to(dtype) for _ in range(2)]
        with torch.no_grad():
            for norm in norms:
                norm.weight.copy_(torch.rand(head_dim, generator=g) + 0.5)
    ref_q, ref_k = RotaryEmbedding.forward(rope, positions, q.cpu(), k.cpu(), *norms)  # torch path on CPU
    fused = (norms[0].weight.to(DEVICE), norms[1].weight.to(DEVICE), 1e-6) if head_norms else None
    got_q, got_k = fk.rotary(positions.to(DEVICE), q, k, rope.cos_sin_cache.to(DEVICE), head_dim, fused)
    assert rel(got_q.cpu(), ref_q) < tol and rel(got_k.cpu(), ref_k) < tol
    if head_norms:  # the norms did something: the fused result is not the plain rotation's
        plain_q, _ = RotaryEmbedding.forward(rope, positions, q.cpu(), k.cpu())
        assert rel(got_q.cpu(), plain_q) > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_norms", [False, True])
def test_rotary_writes_keys_and_values_to_the_cache(dtype, head_norms):
    """With cache rows the rotary kernel also writes the rotated keys and the
    values (column slices of one qkv output) to the pool rows at loc: the
    same bits as the rotation then store_kv, and the other rows untouched."""
    head_dim, heads, kv_heads, tokens, slots = (16, 4, 2, 5, 40) if DEVICE == "cpu" else (128, 32, 8, 300, 4096)
    g = torch.Generator().manual_seed(5)
    rope = RotaryEmbedding(head_dim, 512, {"rope_type": "default", "rope_theta": 10000.0})
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g) * 10).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 512, (tokens,), generator=g).to(DEVICE)
    norms = (torch.rand(head_dim, generator=g).to(DEVICE, dtype) + 0.5,
             torch.rand(head_dim, generator=g).to(DEVICE, dtype) + 0.5, 1e-6) if head_norms else None
    cos_sin = rope.cos_sin_cache.to(DEVICE)
    loc = torch.randperm(slots, generator=g)[:tokens].to(DEVICE)
    fill = torch.randn(slots, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    rows = fk.KVCacheRows(loc, fill.clone(), fill.clone())
    got_q, got_k = fk.rotary(positions, q, k, cos_sin, head_dim, norms, cache=(v, rows))
    ref_q, ref_k = fk.rotary(positions, q, k, cos_sin, head_dim, norms)
    ref_k_buf, ref_v_buf = fill.clone(), fill.clone()
    fk.store_kv(ref_k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim), loc, ref_k_buf, ref_v_buf)
    assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)
    assert torch.equal(rows.k_buf, ref_k_buf) and torch.equal(rows.v_buf, ref_v_buf)
    assert not torch.equal(rows.k_buf, fill) and not torch.equal(rows.v_buf, fill)
    with pytest.raises(ValueError, match="cache rows"):
        fk.rotary(positions, q, k, cos_sin, head_dim, norms, cache=(v[:, :head_dim], rows))


def test_empty_batch():
    x = torch.empty(0, 64, device=DEVICE)
    assert fk.rms_norm(x, torch.ones(64, device=DEVICE), 1e-6).shape == (0, 64)
    assert fk.silu_and_mul(torch.empty(0, 128, device=DEVICE)).shape == (0, 64)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="needs 9 GB of GPU memory")
def test_silu_and_mul_past_two_billion_elements():
    """A 75,000-token prefill of Llama-8B's MLP: [T, 2 x 14,336] has more than
    2^31 elements, so the row offsets must not be 32-bit. The last rows (the
    ones an overflow would send elsewhere) match torch."""
    rows, inter = 75_000, 14_336
    x = torch.randn(rows, 2 * inter, dtype=torch.bfloat16, device=DEVICE)
    out = fk.silu_and_mul(x)
    assert rel(out[-8:].cpu(), SiluAndMul()(x[-8:].cpu())) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_on_strided_views(dtype):
    """K and V as column slices of one qkv output land in the pool rows at loc."""
    kv_heads, head_dim, tokens, slots = (2, 16, 5, 40) if DEVICE == "cpu" else (8, 128, 300, 4096)
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(tokens, 4 * kv_heads * head_dim, generator=g).to(DEVICE, dtype)
    k = qkv[:, 2 * kv_heads * head_dim:3 * kv_heads * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, 3 * kv_heads * head_dim:].view(tokens, kv_heads, head_dim)
    loc = torch.randperm(slots, generator=g)[:tokens].to(DEVICE)
    k_buf = torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v_buf = torch.zeros_like(k_buf)
    fk.store_kv(k, v, loc, k_buf, v_buf)
    ref_k, ref_v = torch.zeros_like(k_buf), torch.zeros_like(v_buf)
    ref_k[loc], ref_v[loc] = k, v
    assert torch.equal(k_buf, ref_k) and torch.equal(v_buf, ref_v)


# The interpreter's float32 -> FP8 conversion rounds unlike torch's: FP8 on a GPU only.
FP8_ON_GPU = pytest.param(torch.float8_e4m3fn, marks=pytest.mark.skipif(DEVICE == "cpu", reason="interpreter's FP8"))


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32, FP8_ON_GPU])
def test_mla_latent_kv_matches_norm_rope_and_store(dtype, tol, interleaved, cache_dtype):
    """MLA's one kernel between projections and attention against the three
    torch steps it replaces (the latent's RMSNorm, the rotation of q_pe and
    k_pe: DeepSeek's interleaved pairs or rotate-half, the pool's write of
    latent | k_pe at loc), on the strided views the model has; against the
    kernels of those steps (bit for bit under the interpreter); its cache rows
    exactly what the pool writes for its outputs (FP8 saturated alike); and the
    interleaved rotation is not the rotate-half one."""
    from radixserve.mem_cache.mla_pool import MLAKVPool

    heads, nope, rope_dim, lora, tokens, slots = (3, 8, 8, 40, 5, 32) if DEVICE == "cpu" else (16, 128, 64, 512, 300, 4096)
    g = torch.Generator().manual_seed(6)
    rope = RotaryEmbedding(rope_dim, 512, {"rope_type": "default", "rope_theta": 10000.0})
    norm = RMSNorm(lora, 1e-6)
    norm.weight.data = (torch.rand(lora, generator=g) + 0.5).to(dtype)
    # q | kv_a as the model's merged projection gives them: column slices of one output
    q_cols = heads * (nope + rope_dim)
    scale = torch.cat([torch.full((q_cols,), 10.0), torch.full((lora + rope_dim,), 30.0)])
    merged = (torch.randn(tokens, q_cols + lora + rope_dim, generator=g) * scale).to(dtype)
    q, kv_a = merged[:, :q_cols].view(tokens, heads, nope + rope_dim), merged[:, q_cols:]
    positions = torch.randint(0, 512, (tokens,), generator=g)
    loc = torch.randperm(slots, generator=g)[:tokens]

    reference = MLAKVPool(slots, 1, lora, rope_dim, cache_dtype, torch.device("cpu"))
    ref_latent = norm(kv_a[:, :lora])
    if interleaved:
        ref_q, ref_k = rope.forward_interleaved(positions, q[..., nope:], kv_a[:, lora:])
    else:
        ref_q, ref_k = rope(positions, q[..., nope:].reshape(tokens, -1), kv_a[:, lora:].contiguous())
    reference.set_mla_kv(0, loc, ref_latent, ref_k)

    dev = lambda t: t.to(DEVICE)  # noqa: E731
    merged_dev = dev(merged)
    q_dev, kv_a_dev = merged_dev[:, :q_cols].view(tokens, heads, -1), merged_dev[:, q_cols:]
    buf = torch.zeros(slots, 1, lora + rope_dim, dtype=cache_dtype, device=DEVICE)
    got_q, got_latent, got_k = fk.mla_latent_kv(
        dev(positions), q_dev[..., nope:], kv_a_dev, dev(norm.weight), norm.eps, dev(rope.cos_sin_cache),
        interleaved, dev(loc), buf)
    assert got_q.shape == ref_q.shape and got_latent.shape == ref_latent.shape and got_k.shape == ref_k.shape
    assert rel(got_q.cpu(), ref_q) < tol and rel(got_k.cpu(), ref_k) < tol and rel(got_latent.cpu(), ref_latent) < tol
    # A value one float32 rounding apart may land on the neighbouring value of a narrower cache.
    cache_tol = tol if cache_dtype == torch.float32 else 3e-2
    assert rel(buf.cpu().float(), reference.latent_buffers[0].float()) < cache_tol
    written = torch.zeros(slots, dtype=torch.bool)
    written[loc] = True
    assert buf[dev(~written)].float().abs().max() == 0  # no other row touched

    pool = MLAKVPool(slots, 1, lora, rope_dim, cache_dtype, torch.device(DEVICE))
    pool.set_mla_kv(0, dev(loc), got_latent, got_k)
    assert buf.float().abs().max() > 0
    if DEVICE == "cpu" and cache_dtype.itemsize < dtype.itemsize:  # the interpreter narrows unlike torch
        assert rel(buf.float(), pool.latent_buffers[0].float()) < cache_tol
    else:
        assert torch.equal(buf.float(), pool.latent_buffers[0].float())

    # The rotary and RMSNorm kernels: the interleaved pairs copied to [evens | odds] first, as the torch path does.
    q_pe, k_pe = q_dev[..., nope:], kv_a_dev[:, lora:]
    if interleaved:
        q_pe, k_pe = (torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1) for x in (q_pe, k_pe))
    sep_q, sep_k = fk.rotary(dev(positions), q_pe, k_pe, dev(rope.cos_sin_cache), rope_dim)
    sep_latent = fk.rms_norm(kv_a_dev[:, :lora], dev(norm.weight), norm.eps)
    if DEVICE == "cpu":  # the interpreter computes both alike
        assert torch.equal(got_q, sep_q) and torch.equal(got_k, sep_k) and torch.equal(got_latent, sep_latent)
    else:  # compiled, each kernel sums the norm's squares in its own order (its warps)
        assert rel(got_latent, sep_latent) < tol and rel(got_q, sep_q) < tol and rel(got_k, sep_k) < tol

    other_q, _, _ = fk.mla_latent_kv(dev(positions), q_dev[..., nope:], kv_a_dev, dev(norm.weight), norm.eps,
                                     dev(rope.cos_sin_cache), not interleaved, dev(loc), torch.zeros_like(buf))
    assert rel(other_q.cpu(), ref_q) > 0.5
