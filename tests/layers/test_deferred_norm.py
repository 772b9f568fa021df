"""DeferredNorm: a decoder layer's RMSNorm handed unapplied to the module
after it, at one row on CUDA. Whatever reads it (a Linear, a router, a MoE
block, an MLP) must give what it gives for the normed row, and leave the
residual stream's next value (`summed`) as RMSNorm returns it. On a GPU the
first one-row product folds the norm into its GEMV (`gemv_after_norm`); on
the CPU the norm runs first (`value()`), which these tests cover there."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers import gemv as gemv_module
from radixserve.layers.layernorm import DeferredNorm, RMSNorm
from radixserve.layers.linear import Linear, MergedLinear
from radixserve.layers.moe.topk import float32_router_logits
from radixserve.models.llama import LlamaMLP, norm_then

CUDA = torch.cuda.is_available()
DEVICE, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
TOL = 1e-2 if CUDA else 1e-6  # the folded kernel sums the norm's squares in another order
pytestmark = [pytest.mark.gpu] if CUDA else []
HIDDEN = 2048 if CUDA else 64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def folds(monkeypatch):
    """The norms folded into a GEMV kernel during the test."""
    calls = []
    real = gemv_module.gemv_after_norm
    monkeypatch.setattr(gemv_module, "gemv_after_norm", lambda *a, **kw: calls.append(a[4].shape) or real(*a, **kw))
    return calls


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(HIDDEN, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(HIDDEN, generator=g) + 0.5)
    x = (torch.randn(1, HIDDEN, generator=g) * 3).to(DEVICE, DTYPE)
    residual = torch.randn(1, HIDDEN, generator=g).to(DEVICE, DTYPE)
    return norm.to(DEVICE, DTYPE), x, residual, g


def random_linear(layer: torch.nn.Module, g: torch.Generator) -> torch.nn.Module:
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return layer.to(DEVICE, DTYPE)


def test_linear_folds_the_norm_and_a_second_reader_gets_its_value(folds):
    norm, x, residual, g = inputs(0)
    merged = random_linear(MergedLinear(HIDDEN, {"a": 96, "b": 32}, bias=True), g)
    other = random_linear(Linear(HIDDEN, 48), g)
    normed, summed = norm(x, residual)
    pending = DeferredNorm(x, residual, norm)
    assert rel(merged(pending), merged(normed)) < TOL
    assert torch.equal(pending.summed, summed) and rel(pending.normed, normed) < TOL
    assert rel(other(pending), other(normed)) < TOL  # the norm is not applied twice
    assert folds == ([merged.weight.shape] if CUDA else [])


def test_router_logits_fold_the_norm(folds):
    norm, x, residual, g = inputs(1)
    router = torch.randn(64, HIDDEN, generator=g).to(DEVICE, DTYPE)
    normed, summed = norm(x, residual)
    pending = DeferredNorm(x, residual, norm)
    logits = float32_router_logits(pending, router)
    assert logits.dtype == torch.float32 and rel(logits, float32_router_logits(normed, router)) < TOL
    assert torch.equal(pending.summed, summed)
    assert folds == ([router.shape] if CUDA else [])


@pytest.mark.parametrize("folding", [True, False])
def test_norm_then_hands_a_folding_module_the_norm_unapplied(folding, folds, monkeypatch):
    norm, x, residual, g = inputs(2)
    mlp = random_linear(LlamaMLP(HIDDEN, 256), g)
    monkeypatch.setattr(LlamaMLP, "folds_input_norm", folding)
    normed, summed = norm(x, residual)
    out, new_residual = norm_then(norm, x, residual, mlp, mlp)
    assert rel(out, mlp(normed)) < TOL and torch.equal(new_residual, summed)
    assert folds == ([mlp.gate_up_proj.weight.shape] if CUDA and folding else [])


def test_a_module_that_never_reads_its_input_still_gets_the_residual():
    norm, x, residual, _ = inputs(3)
    out, new_residual = norm_then(norm, x, residual, LlamaMLP(HIDDEN, 8), lambda ignored: x)
    assert torch.equal(new_residual, norm(x, residual)[1])
