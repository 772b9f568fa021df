"""The FP8 Triton kernels against the torch code they stand for: the per-token
quantization against `quantize_per_row`, the weight-only matmul against the
activations times the dequantized weight in float32. On the CPU they run under
TRITON_INTERPRET=1 (set in conftest); on a GPU at a Llama-8B layer's sizes,
with `fp8_linear` taking both of its CUDA paths."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers import fp8_kernels
from radixserve.layers.quantization import FP8_DTYPE, fp8_linear, quantize_per_row

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().view(-1, 1)


@pytest.mark.parametrize("cols", [96, 2500])  # one block, and several (blocks of 2,048) with a ragged end
def test_quantize_rows_equals_the_torch_quantizer(cols):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, cols, generator=g) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0.0  # an all-zero row keeps the smallest scale, as in torch
    q, scale = fp8_kernels.quantize_rows_fp8(x.to(DEVICE))
    ref_q, ref_scale = quantize_per_row(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (6, 1)
    assert torch.allclose(scale.cpu(), ref_scale, rtol=1e-6, atol=0)
    # the same E4M3 values; a GPU's division may round a tie the other way
    differ = (q.cpu().float() != ref_q.float()).float().mean().item()
    assert differ == 0.0 if not CUDA else differ < 1e-3
    assert rel(dequantize(q, scale).cpu(), x) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs 7 GB of GPU memory")
def test_quantize_rows_past_two_billion_elements():
    """A 150,000-token prefill into Llama-8B's down projection: [T, 14,336]
    has more than 2^31 elements, so the row offsets must not be 32-bit (they
    were, and profile_decode's 256 x 640 prefill faulted). The last rows, the
    ones an overflow sends elsewhere, match the torch quantizer."""
    rows, cols = 150_000, 14_336
    x = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
    q, scale = fp8_kernels.quantize_rows_fp8(x)
    ref_q, ref_scale = quantize_per_row(x[-4:].float().cpu())
    assert torch.allclose(scale[-4:].cpu(), ref_scale, rtol=1e-6, atol=0)
    assert (q[-4:].cpu().float() != ref_q.float()).float().mean().item() < 1e-3


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows", [1, 5, 17])  # one row (the GEMV), a partial tile, two tiles of 16
@pytest.mark.parametrize("bias", [False, True])
def test_weight_only_matmul_equals_the_dequantized_product(dtype, tol, rows, bias):
    g = torch.Generator().manual_seed(rows)
    n, k = 48, 80
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 2, n)[:, None]  # per-row scales that matter
    wq, ws = quantize_per_row(w)
    x = torch.randn(rows, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    # tiles smaller than the shape, so the column and K loops have ragged ends
    tiles = fp8_kernels.WeightOnlyTiles(block_n=32, block_k=32, num_warps=4, num_stages=2)
    out = fp8_kernels.fp8_weight_only_matmul(
        x.to(DEVICE), wq.to(DEVICE), ws.view(-1).to(DEVICE), b.to(DEVICE) if bias else None, tiles)
    reference = x.float() @ dequantize(wq, ws).T + (b.float() if bias else 0)
    assert out.dtype == dtype and out.shape == (rows, n)
    assert rel(out.cpu(), reference) < tol


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 16, 17, 300])  # GEMV, weight-only tiles up to 16 rows, then quantize + FP8 GEMM
def test_fp8_linear_both_cuda_paths_at_llama_sizes(rows):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 4096, generator=g) / 64
    wq, ws = (t.cuda() for t in quantize_per_row(w))
    x = torch.randn(rows, 4096, generator=g).to("cuda", torch.bfloat16)
    out = fp8_linear(x, wq, ws.view(-1), None)
    unquantized_x = x.float() @ dequantize(wq, ws).T
    assert out.dtype == torch.bfloat16
    if rows <= fp8_kernels.WEIGHT_ONLY_MAX_ROWS:
        assert rel(out, unquantized_x) < 1e-2
    else:
        xq, xs = quantize_per_row(x)
        assert rel(out, dequantize(xq, xs) @ dequantize(wq, ws).T) < 1e-2
        assert rel(out, unquantized_x) < 5e-2
