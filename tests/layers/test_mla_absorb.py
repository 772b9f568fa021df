"""MLA's per-head products of a small decode step (layers/attention/mla_absorb.py)
against torch.bmm on the same views of kv_b_proj's weight. On the CPU under
TRITON_INTERPRET=1 (conftest); on a GPU at DeepSeek-V2-Lite's sizes."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers.attention import mla_absorb
from radixserve.layers.attention.mla import MLAAttention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []
# heads, nope, rope, v, lora: the tiny test models' unequal non-powers of two; V2-Lite's on a GPU
SHAPES = [(3, 16, 8, 24, 40)] if DEVICE == "cpu" else [(3, 16, 8, 24, 40), (16, 128, 64, 128, 512)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads,nope,rope,v,lora", SHAPES)
@pytest.mark.parametrize("tokens", [1, 5])
def test_absorption_gemvs_equal_the_batched_products(dtype, tol, heads, nope, rope, v, lora, tokens):
    g = torch.Generator().manual_seed(tokens)
    layer = MLAAttention(heads, nope, rope, v, lora, scaling=1.0, layer_id=0)
    kv_b = (torch.randn(heads * (nope + v), lora, generator=g) / lora ** 0.5).to(DEVICE, dtype)
    w_uk, w_uv = layer.split_kv_b(kv_b)
    q = torch.randn(tokens, heads, nope + rope, generator=g).to(DEVICE, dtype)
    q_nope = q[..., :nope]  # a column slice of each head, as the model passes it
    out_latent = torch.randn(tokens, heads, lora, generator=g).to(DEVICE, dtype)

    q_latent = mla_absorb.query_to_latent(q_nope, w_uk)
    value = mla_absorb.latent_to_value(out_latent, w_uv)

    ref_latent = torch.bmm(q_nope.float().transpose(0, 1), w_uk.float()).transpose(0, 1)
    ref_value = torch.bmm(out_latent.float().transpose(0, 1), w_uv.float().transpose(1, 2)).transpose(0, 1)
    assert q_latent.shape == (tokens, heads, lora) and q_latent.dtype == dtype and q_latent.is_contiguous()
    assert value.shape == (tokens, heads, v) and value.dtype == dtype and value.is_contiguous()
    assert rel(q_latent, ref_latent) < tol and rel(value, ref_value) < tol


def test_taken_for_a_few_cuda_tokens_only():
    w = torch.zeros(2, 4, 8)
    assert not mla_absorb.takes(torch.zeros(1, 2, 4), w)  # the CPU: torch's bmm
    if DEVICE == "cuda":
        w = w.cuda()
        assert mla_absorb.takes(torch.zeros(1, 2, 4, device="cuda"), w)
        assert not mla_absorb.takes(torch.zeros(mla_absorb.FEW_TOKENS_MAX + 1, 2, 4, device="cuda"), w)
