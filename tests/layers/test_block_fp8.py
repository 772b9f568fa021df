"""Block-scaled FP8 (DeepSeek's checkpoints kept in FP8): the Triton kernels
against the dequantized product x @ dequantize_block_fp8(w, s).T, at ragged
shapes and small blocks on the CPU (Triton's interpreter), and at DeepSeek-V3's
sizes on a GPU; the fused MoE kernel with block-FP8 experts against the torch
experts on the dequantized weights; how a tensor-parallel shard cuts the block
scales."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers import block_fp8_kernels, gemv
from radixserve.layers.block_fp8 import block_fp8_linear, dequantize_block_fp8, quantize_block_fp8
from radixserve.layers.moe.activation import ExpertActivation, apply_activation
from radixserve.layers.moe.fused_moe_triton import fused_experts_triton
from radixserve.layers.moe.layer import ExpertBlockScales
from radixserve.layers.moe.torch_experts import fused_experts_torch
from radixserve.layers.quantization import FP8_DTYPE, quantize_per_row
from radixserve.layers.sharding import ShardSlice, block_scale_slice

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quantize_groups_reference(x: torch.Tensor, group: int):
    """Per token and per `group` columns, in torch: (q [M, K], scales [M, ceil(K/group)])."""
    rows, cols = x.shape
    groups = -(-cols // group)
    padded = torch.zeros(rows, groups * group)
    padded[:, :cols] = x.float()
    q, scale = quantize_per_row(padded.view(rows * groups, group))
    return q.view(rows, -1)[:, :cols], scale.view(rows, groups)


def block_weight(n: int, k: int, block, seed: int):
    """A random weight whose blocks have unlike ranges, as its (q, scales)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 2, n)[:, None] * torch.logspace(1, -1, k)[None, :]
    return quantize_block_fp8(w, block)


def test_quantize_block_fp8_round_trips_and_checks_scale_shapes():
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_block_fp8(w, (16, 32))
    assert q.dtype == FP8_DTYPE and scale.shape == (3, 3)  # partial last blocks on both axes
    assert rel(dequantize_block_fp8(q, scale, (16, 32)), w) < 0.05
    assert q.float().abs().amax() == 448  # some block's largest value maps to E4M3's largest
    with pytest.raises(ValueError, match=r"needs scales \[\.\.\., 3, 3\]"):
        dequantize_block_fp8(q, scale[:, :2], (16, 32))


def test_quantize_groups_kernel_equals_the_torch_quantizer():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 72, generator=g) * torch.logspace(-3, 3, 5)[:, None]  # 72: a ragged last group
    x[2, 16:32] = 0.0  # an all-zero group keeps the smallest scale
    q, scale = block_fp8_kernels.quantize_groups_fp8(x.to(DEVICE), 16)
    ref_q, ref_scale = quantize_groups_reference(x, 16)
    assert q.dtype == FP8_DTYPE and scale.shape == (5, 5)
    assert torch.allclose(scale.cpu(), ref_scale, rtol=1e-6, atol=0)
    differ = (q.cpu().float() != ref_q.float()).float().mean().item()
    assert differ == 0.0 if not CUDA else differ < 1e-3  # a GPU's division may round a tie the other way
    with pytest.raises(ValueError, match="power of two"):
        block_fp8_kernels.quantize_groups_fp8(x, 24)


# (n, k) not multiples of the blocks; 5 rows: a partial row tile, 17: two tiles;
# (32, 16): row and column blocks of unlike sizes
@pytest.mark.parametrize("rows,block", [(5, (16, 16)), (17, (32, 16))])
def test_block_matmul_equals_the_dequantized_product(rows, block):
    n, k = 40, 72
    wq, ws = block_weight(n, k, block, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3))
    w = dequantize_block_fp8(wq, ws, block)
    tiles = block_fp8_kernels.BlockGemmTiles(block_m=16, block_n=16, num_warps=4, num_stages=2)
    dev = lambda t: t.to(DEVICE)  # noqa: E731

    # weight-only: x as it is, only the weight's block scales
    out = block_fp8_kernels.block_fp8_matmul(dev(x), None, dev(wq), dev(ws), block, torch.float32, dev(bias), tiles)
    assert out.shape == (rows, n) and rel(out.cpu(), x @ w.T + bias) < 1e-5

    # quantized activations: exact against the dequantized activations, and
    # within E4M3's precision of the unquantized product
    xq, xs = block_fp8_kernels.quantize_groups_fp8(dev(x), block[1])
    out = block_fp8_kernels.block_fp8_matmul(xq, xs, dev(wq), dev(ws), block, torch.float32, None, tiles)
    x_seen = dequantize_block_fp8(xq.cpu(), xs.cpu(), (1, block[1]))
    assert rel(out.cpu(), x_seen @ w.T) < 1e-5
    assert rel(out.cpu(), x @ w.T) < 0.05


def test_block_matmul_bfloat16_and_gemv_with_block_scales():
    block = (16, 16)
    wq, ws = block_weight(40, 72, block, seed=4)
    w = dequantize_block_fp8(wq, ws, block)
    x = torch.randn(3, 72, generator=torch.Generator().manual_seed(5))
    out = block_fp8_kernels.block_fp8_matmul(x.to(DEVICE, torch.bfloat16), None, wq.to(DEVICE), ws.to(DEVICE),
                                             block, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and rel(out.cpu(), x.bfloat16().float() @ w.T) < 1e-2
    # one row: the GEMV reads each weight row with its block's scales
    one = gemv.gemv(x[:1].to(DEVICE), wq.to(DEVICE), ws.to(DEVICE), None, scale_block=block)
    assert rel(one.cpu(), x[:1] @ w.T) < 1e-5
    # and with the MLP's SiLU fused in (x = [gate | up], the down projection's input)
    gate_up = torch.cat([x[1:2], x[2:3]], dim=-1)
    one = gemv.gemv(gate_up.to(DEVICE), wq.to(DEVICE), ws.to(DEVICE), None, silu_gated=True, scale_block=block)
    assert rel(one.cpu(), (torch.nn.functional.silu(x[1:2]) * x[2:3]) @ w.T) < 1e-5
    # and after a decoder layer's norm, folded in (DeepSeek-V3's q_a|kv_a after its input norm)
    norm_weight = torch.rand(72, generator=torch.Generator().manual_seed(6)) + 0.5
    one, normed, _ = gemv.gemv_after_norm(x[:1].to(DEVICE), x[1:2].to(DEVICE), norm_weight.to(DEVICE), 1e-6,
                                          wq.to(DEVICE), ws.to(DEVICE), scale_block=block)
    summed = x[:1] + x[1:2]
    reference = norm_weight * summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert rel(normed.cpu(), reference) < 1e-5 and rel(one.cpu(), reference @ w.T) < 1e-5


def test_wrong_scale_shapes_are_refused():
    wq, ws = block_weight(40, 72, (16, 16), seed=6)
    with pytest.raises(ValueError, match="needs weight_scale"):
        block_fp8_kernels.block_fp8_matmul(torch.randn(2, 72), None, wq, ws[:2], (16, 16), torch.float32)


def test_a_shard_cuts_the_block_scales_on_block_boundaries():
    # rows [256, 512) of 1,024 in blocks of 128: scale rows [2, 4) of 8
    assert block_scale_slice(ShardSlice(0, 256, 256, 1024), 128, "w") == ShardSlice(0, 2, 2, 8)
    # the last shard may end in a partial block
    assert block_scale_slice(ShardSlice(1, 128, 72, 200), 128, "w") == ShardSlice(1, 1, 1, 2)
    with pytest.raises(ValueError, match=r"layer\.weight: entries \[96, 192\) of 384 along dim 0"):
        block_scale_slice(ShardSlice(0, 96, 96, 384), 128, "layer.weight")
    with pytest.raises(ValueError, match="do not fall on 128-blocks"):
        block_scale_slice(ShardSlice(0, 0, 100, 200), 128, "w")


def quantized_then_dequantized(x: torch.Tensor, group: int) -> torch.Tensor:
    """The values the FP8 GEMM sees for activations x: each token's groups through E4M3."""
    q, scale = quantize_groups_reference(x, group)
    return dequantize_block_fp8(q, scale, (1, group))


def block_fp8_experts(num_experts: int, hidden: int, inter: int, block, seed: int, device: str = "cpu"):
    """(E4M3 w13, w2, their ExpertBlockScales, the dequantized w13, w2) on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g, device=device) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g, device=device) / inter ** 0.5
    (q13, s13), (q2, s2) = quantize_block_fp8(w13, block), quantize_block_fp8(w2, block)
    return q13, q2, ExpertBlockScales(s13, s2, block), dequantize_block_fp8(q13, s13, block), \
        dequantize_block_fp8(q2, s2, block)


def experts_with_quantized_inputs(x, w13, w2, weights, ids, group: int) -> torch.Tensor:
    """Each token's experts with both GEMMs' inputs through E4M3 per group, per (token, choice)."""
    out = torch.zeros(x.shape)
    for t in range(x.shape[0]):
        for weight, e in zip(weights[t].tolist(), ids[t].tolist()):
            gate_up = quantized_then_dequantized(x[t:t + 1], group) @ w13[e].T
            act = apply_activation(gate_up, ExpertActivation("silu"))
            out[t] += weight * (quantized_then_dequantized(act, group) @ w2[e].T)[0]
    return out


# 5 tokens: a decode's, activations unquantized; 20: quantized per token and group
@pytest.mark.parametrize("tokens", [5, 20])
def test_fused_moe_with_block_fp8_experts(tokens):
    block, num_experts, hidden, inter, top_k = (16, 16), 4, 48, 40, 2  # 40: down's K ends in a partial group
    q13, q2, scales, w13, w2 = block_fp8_experts(num_experts, hidden, inter, block, seed=tokens)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, hidden, generator=g)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)]).int()
    weights = torch.rand(tokens, top_k, generator=g)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    out = fused_experts_triton(dev(x), dev(q13), dev(q2), dev(weights), dev(ids), ExpertActivation("silu"),
                               block_scales=ExpertBlockScales(dev(scales.w13), dev(scales.w2), block)).cpu()
    unquantized = fused_experts_torch(x, w13, w2, weights, ids, ExpertActivation("silu"))
    if tokens <= 16:
        assert rel(out, unquantized) < 1e-5
    else:
        assert rel(out, experts_with_quantized_inputs(x, w13, w2, weights, ids, block[1])) < 1e-5
        assert rel(out, unquantized) < 0.08


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_deepseek_v3_experts_on_gpu(tokens):
    """8 of DeepSeek-V3's experts (hidden 7,168, intermediate 2,048), 4 chosen per token."""
    block, num_experts, hidden, inter, top_k = (128, 128), 8, 7168, 2048, 4
    q13, q2, scales, w13, w2 = block_fp8_experts(num_experts, hidden, inter, block, seed=tokens, device="cuda")
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)]).int().cuda()
    weights = torch.rand(tokens, top_k, device="cuda")
    out = fused_experts_triton(x, q13, q2, weights, ids, ExpertActivation("silu"), block_scales=scales)
    ref = fused_experts_torch(x.float(), w13, w2, weights, ids, ExpertActivation("silu"))
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) < (2e-2 if tokens <= 16 else 0.08)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n,k", [(2048, 7168), (7168, 2048), (24576, 1536), (576, 7168)])
@pytest.mark.parametrize("rows", [1, 16, 300])  # the GEMV, the weight-only GEMM, the FP8 GEMM
def test_deepseek_v3_sizes_on_gpu(n, k, rows):
    block = (128, 128)
    wq, ws = (t.cuda() for t in block_weight(n, k, block, seed=rows))  # (at most 176 MB in float32)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = dequantize_block_fp8(wq, ws, block)
    out = block_fp8_linear(x, wq, ws, None, block)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    if rows <= 16:  # the activations as they are: only the output's bfloat16 rounding
        assert rel(out, x.float() @ w.T) < 1e-2
    else:
        xq, xs = block_fp8_kernels.quantize_groups_fp8(x, 128)
        assert rel(out, dequantize_block_fp8(xq, xs, (1, 128)) @ w.T) < 1e-2
        assert rel(out, x.float() @ w.T) < 0.05
