"""layers/gemv.py against the float32 product it stands for: one row times a
bfloat16, float32 or FP8 (per-channel scales) weight, with and without bias,
tiles that leave ragged ends. On the CPU under
TRITON_INTERPRET=1 (conftest); on a GPU at a Llama-8B and a Qwen3-0.6B size
with the tiles `gemv_tiles` picks, and through `Linear` and `fp8_linear`,
which take it for one row."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers import gemv as gemv_module
from radixserve.layers.quantization import quantize_per_row

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def weight_and_reference(fmt: str, n: int, k: int, g: torch.Generator):
    """(weight, scale or None, the float32 weight it stands for)."""
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 2, n)[:, None]
    if fmt == "fp8":
        wq, ws = quantize_per_row(w)
        return wq, ws.view(-1), wq.float() * ws
    w = w.to(getattr(torch, fmt))
    return w, None, w.float()


@pytest.fixture(params=[False, True], ids=["plain", "pdl"])
def pdl(request, monkeypatch):
    """Both launches: plain, and with programmatic dependent launch (the first
    weight tile read before the wait; the interpreter runs that path without
    the waits)."""
    monkeypatch.setattr(gemv_module, "use_pdl", lambda device: request.param)
    return request.param


@pytest.mark.parametrize("fmt,dtype,tol", [("float32", torch.float32, 1e-6), ("bfloat16", torch.bfloat16, 1e-2),
                                           ("fp8", torch.bfloat16, 1e-2), ("fp8", torch.float32, 1e-6)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_equals_the_float32_product(fmt, dtype, tol, bias, pdl):
    g = torch.Generator().manual_seed(0)
    n, k = 21, 300  # ragged against tiles of 8 rows and steps of 32 columns
    w, scale, reference_w = weight_and_reference(fmt, n, k, g)
    x = torch.randn(1, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    tiles = gemv_module.GemvTiles(block_n=8, block_k=32, num_warps=4)
    out = gemv_module.gemv(x.to(DEVICE), w.to(DEVICE), None if scale is None else scale.to(DEVICE),
                           None if b is None else b.to(DEVICE), tiles)
    reference = x.float() @ reference_w.T + (b.float() if bias else 0)
    assert out.dtype == dtype and out.shape == (1, n)
    assert rel(out.cpu(), reference) < tol


@pytest.mark.parametrize("fmt,dtype,tol", [("float32", torch.float32, 1e-6), ("bfloat16", torch.bfloat16, 1e-2),
                                           ("fp8", torch.bfloat16, 1e-2)])
def test_silu_gated_gemv_equals_silu_and_mul_then_the_product(fmt, dtype, tol, pdl):
    from radixserve.layers.activation import SiluAndMul

    g = torch.Generator().manual_seed(1)
    n, k = 21, 300
    w, scale, reference_w = weight_and_reference(fmt, n, k, g)
    gate_up = (torch.randn(1, 2 * k, generator=g) * 3).to(dtype)
    tiles = gemv_module.GemvTiles(block_n=8, block_k=32, num_warps=4)
    out = gemv_module.gemv(gate_up.to(DEVICE), w.to(DEVICE), None if scale is None else scale.to(DEVICE),
                           None, tiles, silu_gated=True)
    reference = SiluAndMul()(gate_up).float() @ reference_w.T
    assert out.shape == (1, n) and rel(out.cpu(), reference) < tol


def rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(normed, x + residual) in RMSNorm's torch order, x's dtype."""
    summed = (x.float() + residual.float()).to(x.dtype)
    normed = torch.nn.functional.rms_norm(summed.float(), summed.shape[-1:], eps=eps).to(x.dtype)
    return (weight * normed).to(x.dtype), summed


@pytest.mark.parametrize("fmt,dtype,tol", [("float32", torch.float32, 1e-6), ("bfloat16", torch.bfloat16, 1e-2),
                                           ("fp8", torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_after_norm_equals_rms_norm_then_the_product(fmt, dtype, tol, bias, pdl):
    """A decoder layer's next RMSNorm with its residual add, folded into the
    product after it: the product, and the normed row and x + residual as
    RMSNorm returns them (the sum exactly, but under the interpreter, which
    rounds float32 to bfloat16 by truncation; the normed row within one
    rounding, since the squares are summed in another order)."""
    g = torch.Generator().manual_seed(4)
    n, k = 21, 300
    w, scale, reference_w = weight_and_reference(fmt, n, k, g)
    x, residual = (torch.randn(1, k, generator=g) * 4).to(dtype), torch.randn(1, k, generator=g).to(dtype)
    norm_weight = (torch.rand(k, generator=g) + 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    tiles = gemv_module.GemvTiles(block_n=8, block_k=32, num_warps=4)
    out, normed, summed = gemv_module.gemv_after_norm(
        x.to(DEVICE), residual.to(DEVICE), norm_weight.to(DEVICE), 1e-6, w.to(DEVICE),
        None if scale is None else scale.to(DEVICE), None if b is None else b.to(DEVICE), tiles=tiles)
    ref_normed, ref_summed = rms_norm_reference(x, residual, norm_weight, 1e-6)
    assert torch.equal(summed.cpu(), ref_summed) if CUDA or dtype == torch.float32 else \
        rel(summed.cpu(), ref_summed) < 4e-3
    normed_tol = 1e-6 if dtype == torch.float32 else 4e-3 if CUDA else 1.5e-2  # (three truncations)
    assert normed.dtype == dtype and rel(normed.cpu(), ref_normed) < normed_tol
    reference = ref_normed.float() @ reference_w.T + (b.float() if bias else 0)
    assert out.dtype == dtype and out.shape == (1, n) and rel(out.cpu(), reference) < tol


def test_gemv_after_norm_refuses_a_residual_of_another_shape():
    with pytest.raises(ValueError, match="residual of its shape"):
        gemv_module.gemv_after_norm(torch.zeros(1, 8), torch.zeros(1, 4), torch.ones(8), 1e-6, torch.zeros(4, 8))


def test_bfloat16_gemv_with_a_float32_output_is_the_float32_product(pdl):
    """DeepSeek's router: bfloat16 hidden and weight, logits in float32. Each
    product is exact in float32, so only the summation order differs from
    F.linear on the widened tensors, far below a bfloat16 output's rounding."""
    g = torch.Generator().manual_seed(2)
    n, k = 21, 300
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    tiles = gemv_module.GemvTiles(block_n=8, block_k=32, num_warps=4)
    out = gemv_module.gemv(x.to(DEVICE), w.to(DEVICE), tiles=tiles, out_dtype=torch.float32)
    reference = torch.nn.functional.linear(x.float(), w.float())
    assert out.dtype == torch.float32 and rel(out.cpu(), reference) < 1e-6
    rounded = gemv_module.gemv(x.to(DEVICE), w.to(DEVICE), tiles=tiles)
    assert rel(rounded.cpu(), reference) > 1e-5  # the bfloat16 output is measurably rounded


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_float32_router_logits_for_one_row_and_more():
    from radixserve.layers.moe.topk import float32_router_logits

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 2048, generator=g).to("cuda", torch.bfloat16)
    x = torch.randn(3, 2048, generator=g).to("cuda", torch.bfloat16)
    reference = torch.nn.functional.linear(x.float(), w.float())
    for rows in (1, 3):
        got = float32_router_logits(x[:rows], w)
        assert got.dtype == torch.float32 and rel(got, reference[:rows]) < 1e-6


def test_gemv_refuses_more_than_one_row():
    with pytest.raises(ValueError, match="one contiguous row"):
        gemv_module.gemv(torch.zeros(2, 8), torch.zeros(4, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n,k", [(4096, 14336), (1024, 3072), (151936, 1024)])
@pytest.mark.parametrize("fmt", ["bfloat16", "fp8"])
def test_gemv_at_model_sizes_with_its_own_tiles(n, k, fmt):
    g = torch.Generator().manual_seed(0)
    w, scale, reference_w = weight_and_reference(fmt, n, k, g)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    out = gemv_module.gemv(x.cuda(), w.cuda(), None if scale is None else scale.cuda())
    assert rel(out.cpu(), x.float() @ reference_w.T) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_linear_takes_the_gemv_for_one_row_and_cublas_for_more():
    from radixserve.layers.linear import Linear
    from radixserve.layers.quantization import fp8_linear

    g = torch.Generator().manual_seed(1)
    layer = Linear(2048, 1024, bias=True).to("cuda", torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(1024, 2048, generator=g) / 32)
        layer.bias.copy_(torch.randn(1024, generator=g))
    x = torch.randn(2, 2048, generator=g).to("cuda", torch.bfloat16)
    reference = x.float() @ layer.weight.float().T + layer.bias.float()
    one_row, two_rows = layer(x[:1]), layer(x)
    assert rel(one_row, reference[:1]) < 1e-2 and rel(two_rows, reference) < 1e-2
    # with the MLP's activation fused in (one row) and not (two rows)
    from radixserve.layers.activation import SiluAndMul

    gate_up = torch.randn(2, 4096, generator=g).to("cuda", torch.bfloat16)
    activated = SiluAndMul()(gate_up)
    reference = activated.float() @ layer.weight.float().T + layer.bias.float()
    assert rel(layer(gate_up[:1], activation=SiluAndMul()), reference[:1]) < 1e-2
    assert rel(layer(gate_up, activation=SiluAndMul()), reference) < 1e-2
    wq, ws = quantize_per_row(layer.weight.float())
    assert rel(fp8_linear(x[:1], wq, ws.view(-1), None), x[:1].float() @ (wq.float() * ws).T) < 1e-2


@pytest.mark.parametrize("activated", [False, True])
def test_linear_adds_an_addend_in_its_one_row_kernel(activated, monkeypatch):
    """Linear(x, addend=a) is x @ W.T + a at one row and at two; on CUDA the
    one-row product takes it as the GEMV's bias (DeepSeek's shared experts add
    the routed sum so), and a layer with a bias of its own adds it after."""
    from radixserve.layers.activation import SiluAndMul
    from radixserve.layers.linear import Linear

    g = torch.Generator().manual_seed(2)
    layer = Linear(256, 128).to(DEVICE, torch.float32)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(128, 256, generator=g) / 16)
    x = torch.randn(2, 512 if activated else 256, generator=g).to(DEVICE)
    addend = torch.randn(2, 128, generator=g).to(DEVICE)
    act = SiluAndMul() if activated else None
    reference = (act(x) if activated else x) @ layer.weight.T + addend
    biases = []
    real_gemv = gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **kw: biases.append(a[3]) or real_gemv(*a, **kw))
    assert rel(layer(x[:1], activation=act, addend=addend[:1]), reference[:1]) < 1e-5
    assert rel(layer(x, activation=act, addend=addend), reference) < 1e-5
    assert [b.data_ptr() for b in biases] == ([addend.data_ptr()] if CUDA else [])
    layer.bias = torch.nn.Parameter(torch.randn(128, generator=g).to(DEVICE))
    assert rel(layer(x[:1], activation=act, addend=addend[:1]), reference[:1] + layer.bias) < 1e-5
