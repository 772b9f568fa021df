"""invariant_linear: a row's result is bit-identical whatever the number of rows,
on the CPU path and in the Triton kernel (interpreted here, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers.batch_invariant import _triton_linear, invariant_linear

SHAPES = [(64, 128), (576, 1536), (1536, 576)]  # tiny test model, SmolLM2-135M projections


@pytest.fixture(params=["default", 16], ids=["own-threads", "16-threads"])
def cpu_threads(request):
    """The machine's own thread count, and 16 (MKL splits its work otherwise
    with many threads; oversubscribing a small machine only slows it)."""
    before = torch.get_num_threads()
    if request.param != "default":
        torch.set_num_threads(request.param)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("k,n", SHAPES)
def test_cpu_rows_are_batch_invariant(k, n, cpu_threads):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(300, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    full = invariant_linear(x, w, b)
    torch.testing.assert_close(full, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4)
    for rows in list(range(1, 40)) + [63, 64, 65, 128, 255]:
        for start in (0, 7):
            part = invariant_linear(x[start:start + rows], w, b)
            assert torch.equal(part, full[start:start + rows]), (rows, start)


def test_plain_linear_is_not_batch_invariant_here():
    """Why the mode exists: the library's own result for a row changes with the
    row count on this CPU (MKL takes another path for a few rows)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 576, generator=g), torch.randn(1536, 576, generator=g)
    full = torch.nn.functional.linear(x, w)
    differs = [rows for rows in range(1, 17) if not torch.equal(torch.nn.functional.linear(x[:rows], w), full[:rows])]
    assert differs, "F.linear happened to be batch-invariant on this machine"


def triton_case(dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(70, 96, generator=g, device=device).to(dtype)
    w = torch.randn(80, 96, generator=g, device=device).to(dtype)
    b = torch.randn(80, generator=g, device=device).to(dtype)
    return x, w, b, _triton_linear(x, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_linear(dtype):
    x, w, b, full = triton_case(dtype, "cuda" if torch.cuda.is_available() else "cpu")
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(full.float(), ref, rtol=tol, atol=tol * 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_rows_are_batch_invariant(dtype):
    """On the GPU only: the interpreter multiplies tiles with the CPU's BLAS,
    whose result for a row depends on where the row sits in the tile."""
    x, w, b, full = triton_case(dtype, "cuda")
    for rows, start in [(1, 0), (1, 69), (5, 3), (17, 40), (64, 0), (65, 5)]:
        assert torch.equal(_triton_linear(x[start:start + rows], w, b), full[start:start + rows]), (rows, start)
