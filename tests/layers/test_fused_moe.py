"""The fused MoE Triton kernel against the plain-torch experts, its expert
grouping step, and expert routing (select_experts) against a per-token Python
reference. On CPU the kernels run under TRITON_INTERPRET=1 (conftest) at tiny
sizes; the GPU tests run the Qwen3-30B-A3B layer shape and a CUDA graph."""

from __future__ import annotations

import math
from typing import List, Optional

import pytest
import torch

from radixserve.layers.moe.activation import ExpertActivation, apply_activation
from radixserve.layers.gemv import GemvTiles
from radixserve.layers.moe import few_token_experts
from radixserve.layers.moe.fused_moe_triton import (
    align_pairs_by_expert, fused_experts_triton, gated_activation, max_padded_rows,
)
from radixserve.layers.moe.topk import RoutingConfig, select_experts
from radixserve.layers.moe.topk_triton import select_experts_triton
from radixserve.layers.moe.torch_experts import fused_experts_torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SILU = ExpertActivation("silu")
SWIGLU_LIMIT = 0.7  # small enough that the scaled gate and up rows exceed it
SWIGLU = ExpertActivation("swiglu_oai", alpha=1.702, limit=SWIGLU_LIMIT)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def random_experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int, bias: bool,
                   scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) * scale / math.sqrt(hidden)
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / math.sqrt(inter)
    b13 = torch.randn(num_experts, 2 * inter, generator=g) * 0.5 if bias else None
    b2 = torch.randn(num_experts, hidden, generator=g) * 0.5 if bias else None
    to = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return to(w13), to(w2), to(b13), to(b2)


def routing(pattern: str, tokens: int, num_experts: int, top_k: int, seed: int):
    """[T, K] float32 weights and int32 ids. Every pattern leaves expert 1
    without tokens. "random": K distinct experts per token; "same": every
    token picks the same experts (one expert fills several blocks);
    "repeat": a token may pick one expert more than once."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(num_experts) if e != 1])
    if pattern == "random":
        ids = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:top_k]] for _ in range(tokens)])
    elif pattern == "same":
        ids = allowed[:top_k].expand(tokens, top_k)
    else:
        ids = allowed[torch.randint(0, 2, (tokens, top_k), generator=g)]
    weights = torch.rand(tokens, top_k, generator=g) + 0.1
    return weights.to(DEVICE), ids.to(DEVICE, torch.int32)


# (tokens, experts, top_k, intermediate, id pattern)
CPU_CASES = [
    (1, 4, 1, 16, "random"),
    (1, 8, 4, 24, "random"),
    (2, 8, 3, 20, "random"),  # k not a power of two: the down kernel masks a slot
    (3, 4, 2, 24, "repeat"),
    (17, 8, 2, 20, "random"),
    (17, 6, 4, 16, "same"),
    (40, 8, 4, 24, "random"),
    (40, 5, 2, 16, "same"),
]


@pytest.mark.parametrize("activation", [SILU, SWIGLU], ids=["silu", "swiglu_oai"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("tokens,num_experts,top_k,inter,pattern", CPU_CASES)
def test_matches_torch_experts_float32(tokens, num_experts, top_k, inter, pattern, bias, activation):
    hidden_size = 32
    w13, w2, b13, b2 = random_experts(num_experts, hidden_size, inter, torch.float32, seed=tokens, bias=bias,
                                      scale=4.0)
    weights, ids = routing(pattern, tokens, num_experts, top_k, seed=tokens + top_k)
    hidden = torch.randn(tokens, hidden_size, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    assert 1 not in ids.tolist()  # an expert with no tokens
    out = fused_experts_triton(hidden, w13, w2, weights, ids, activation, b13, b2)
    ref = fused_experts_torch(hidden.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu(), activation,
                              None if b13 is None else b13.cpu(), None if b2 is None else b2.cpu())
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel(out.cpu(), ref) < 1e-5
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_few_token_gemvs_step_through_long_rows(monkeypatch):
    """Rows longer than one step of the few-token kernels (gate_up's K is the
    hidden size, down's the intermediate), not multiples of it: steps of 16
    columns here, where the tiles' 1,024 would cost the interpreter minutes."""
    tiles = GemvTiles(block_n=2, block_k=16, num_warps=4)
    monkeypatch.setattr(few_token_experts, "gate_up_tiles", lambda hidden_size: tiles)
    monkeypatch.setattr(few_token_experts, "down_tiles", lambda inter: tiles)
    hidden_size, inter = 40, 24
    w13, w2, b13, b2 = random_experts(4, hidden_size, inter, torch.float32, seed=2, bias=True)
    weights, ids = routing("random", 2, 4, 2, seed=3)
    hidden = torch.randn(2, hidden_size, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out = fused_experts_triton(hidden, w13, w2, weights, ids, SILU, b13, b2).cpu()
    ref = fused_experts_torch(hidden.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu(), SILU, b13.cpu(), b2.cpu())
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("tokens,top_k,slots,dtype,tol", [
    (1, 3, 2, torch.float32, 1e-5),  # 5 slots: the down kernel masks 3 of 8
    (2, 2, 1, torch.float32, 1e-5),
    (1, 6, 2, torch.bfloat16, 1e-2),  # DeepSeek-V2-Lite's 6 routed + 2 shared: 8 slots, none masked
])
def test_few_token_kernels_add_shared_experts_as_slots(tokens, top_k, slots, dtype, tol):
    """The shared MLP run as extra slots of the two kernels: the routed
    experts' weighted sum plus silu(x G^T) * (x U^T) D^T, computed apart."""
    hidden_size, inter, num_experts = 32, 16, 8
    w13, w2, _, _ = random_experts(num_experts, hidden_size, inter, dtype, seed=tokens, bias=False, scale=4.0)
    g = torch.Generator().manual_seed(top_k)
    gate_up = (torch.randn(2 * slots * inter, hidden_size, generator=g) * 4 / math.sqrt(hidden_size)).to(DEVICE, dtype)
    down = (torch.randn(hidden_size, slots * inter, generator=g) / math.sqrt(slots * inter)).to(DEVICE, dtype)
    weights, ids = routing("random", tokens, num_experts, top_k, seed=tokens + top_k)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(DEVICE, dtype)
    shared = few_token_experts.SharedExperts(gate_up, down)
    out = fused_experts_triton(hidden, w13, w2, weights, ids, SILU, shared=shared).cpu().float()
    f32 = lambda t: t.cpu().float()  # noqa: E731
    routed = fused_experts_torch(f32(hidden), f32(w13), f32(w2), weights.cpu(), ids.cpu(), SILU)
    gate, up = (f32(hidden) @ f32(gate_up).T).chunk(2, dim=-1)
    shared_out = (torch.nn.functional.silu(gate) * up) @ f32(down).T
    assert rel(shared_out, routed) > 0.3  # both parts matter
    assert rel(out, routed + shared_out) < tol


def test_shared_expert_slots_refuse_what_they_cannot_run():
    w13, w2, _, _ = random_experts(4, 32, 16, torch.float32, seed=0, bias=False)
    weights, ids = routing("random", 1, 4, 2, seed=0)
    hidden = torch.randn(1, 32).to(DEVICE)
    ragged = few_token_experts.SharedExperts(torch.zeros(2 * 24, 32, device=DEVICE), torch.zeros(32, 24, device=DEVICE))
    with pytest.raises(ValueError, match="not whole experts"):
        fused_experts_triton(hidden, w13, w2, weights, ids, SILU, shared=ragged)
    whole = few_token_experts.SharedExperts(torch.zeros(2 * 16, 32, device=DEVICE), torch.zeros(32, 16, device=DEVICE))
    many = torch.randn(few_token_experts.FEW_TOKENS_MAX + 1, 32).to(DEVICE)
    many_weights, many_ids = routing("random", len(many), 4, 2, seed=1)
    with pytest.raises(ValueError, match="few-token kernels"):
        fused_experts_triton(many, w13, w2, many_weights, many_ids, SILU, shared=whole)


def test_swiglu_limit_is_hit_and_matched():
    """The clamp of swiglu_oai matters in the test data (gate above the limit,
    up outside +-limit), and the kernel clamps as the torch path does."""
    w13, w2, b13, b2 = random_experts(6, 32, 24, torch.float32, seed=3, bias=True, scale=4.0)
    weights, ids = routing("random", 17, 6, 2, seed=4)
    hidden = torch.randn(17, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    gate_up = torch.einsum("th,eih->tei", hidden.cpu(), w13.cpu()) + b13.cpu()
    gate, up = gate_up.chunk(2, dim=-1)
    assert (gate > SWIGLU_LIMIT).float().mean() > 0.1
    assert (up.abs() > SWIGLU_LIMIT).float().mean() > 0.1
    unclamped = ExpertActivation("swiglu_oai", alpha=1.702, limit=None)
    out = fused_experts_triton(hidden, w13, w2, weights, ids, SWIGLU, b13, b2).cpu()
    args = (hidden.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu())
    assert rel(out, fused_experts_torch(*args, SWIGLU, b13.cpu(), b2.cpu())) < 1e-5
    assert rel(out, fused_experts_torch(*args, unclamped, b13.cpu(), b2.cpu())) > 1e-2


@pytest.mark.parametrize("activation", [SILU, SWIGLU, ExpertActivation("swiglu_oai", alpha=1.0, limit=None)],
                         ids=["silu", "swiglu_oai", "swiglu_oai_nolimit"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)])
def test_gated_activation_matches_apply_activation(activation, dtype, tol):
    gate_up = (torch.randn(9, 2 * 40, generator=torch.Generator().manual_seed(0)) * 2).to(DEVICE, dtype)
    out = gated_activation(gate_up, activation)
    assert out.dtype == dtype
    assert rel(out.cpu(), apply_activation(gate_up.cpu(), activation)) < tol


@pytest.mark.parametrize("tokens", [3, 17], ids=["few_token_gemvs", "grouped_gemm"])
def test_bfloat16_matches_torch_experts(tokens):
    w13, w2, b13, b2 = random_experts(8, 64, 48, torch.bfloat16, seed=11, bias=True)
    weights, ids = routing("random", tokens, 8, 4, seed=12)
    hidden = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(13)).to(DEVICE, torch.bfloat16)
    out = fused_experts_triton(hidden, w13, w2, weights, ids, SILU, b13, b2)
    ref = fused_experts_torch(hidden.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu(), SILU, b13.cpu(), b2.cpu())
    assert out.dtype == torch.bfloat16
    assert rel(out.cpu(), ref) < 1e-2


@pytest.mark.parametrize("tokens,num_experts,top_k,block_m,pattern", [
    (1, 8, 4, 16, "random"), (17, 8, 2, 16, "random"), (40, 6, 4, 16, "same"),
    (40, 5, 2, 32, "repeat"), (300, 16, 4, 16, "random"),
])
def test_align_groups_every_pair_once_by_expert(tokens, num_experts, top_k, block_m, pattern):
    _, ids = routing(pattern, tokens, num_experts, top_k, seed=tokens)
    aligned = align_pairs_by_expert(ids, num_experts, block_m)
    num_pairs = tokens * top_k
    total = int(aligned.num_padded_rows.item())
    flat = ids.flatten().cpu()
    counts = torch.bincount(flat.long(), minlength=num_experts)
    assert total == sum(-(-int(c) // block_m) * block_m for c in counts)
    assert total <= aligned.sorted_pair_ids.numel() == max_padded_rows(num_pairs, num_experts, block_m)

    rows = aligned.sorted_pair_ids[:total].cpu().view(-1, block_m)
    block_experts = aligned.block_expert_ids[:total // block_m].cpu()
    real = rows < num_pairs
    assert sorted(rows[real].tolist()) == list(range(num_pairs))  # each (token, k) pair exactly once
    assert (rows[~real] == num_pairs).all()  # padding rows hold the sentinel
    for block, expert in zip(rows, block_experts):
        pairs = block[block < num_pairs]
        assert len(pairs) > 0 and (flat[pairs] == expert).all()
        assert (pairs == pairs.sort().values).all()  # stable: pair order kept within an expert
    blocks_per_expert = torch.bincount(block_experts.long(), minlength=num_experts)
    assert (blocks_per_expert == (counts + block_m - 1) // block_m).all()
    assert blocks_per_expert[1] == 0  # the expert without tokens gets no block


# ---- routing -------------------------------------------------------------


def _softmax(xs: List[float]) -> List[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def reference_route(logits: List[float], cfg: RoutingConfig, bias: Optional[List[float]]):
    """One token's (weights, ids) by the definitions, one expert at a time."""
    num_experts = len(logits)
    best_first = lambda keys, among: sorted(among, key=lambda e: -keys[e])  # noqa: E731
    if cfg.softmax_after_topk:
        ids = best_first(logits, range(num_experts))[:cfg.top_k]
        return _softmax([logits[e] for e in ids]), ids
    if cfg.scoring == "softmax":
        scores = _softmax(logits)
    else:
        scores = [1 / (1 + math.exp(-x)) for x in logits]
    choice = [s + (bias[e] if bias else 0.0) for e, s in enumerate(scores)]
    eligible = list(range(num_experts))
    if cfg.num_groups > 1:
        size = num_experts // cfg.num_groups
        groups = [list(range(g * size, (g + 1) * size)) for g in range(cfg.num_groups)]
        if bias:
            rank = [sum(sorted((choice[e] for e in grp), reverse=True)[:2]) for grp in groups]
        else:
            rank = [max(choice[e] for e in grp) for grp in groups]
        kept = best_first(rank, range(cfg.num_groups))[:cfg.topk_groups]
        eligible = [e for g in kept for e in groups[g]]
    ids = best_first(choice, eligible)[:cfg.top_k]
    weights = [scores[e] for e in ids]
    if cfg.renormalize:
        weights = [w / sum(weights) for w in weights]
    return [w * cfg.routed_scaling_factor for w in weights], ids


ROUTING_CASES = {
    "softmax_renorm": (RoutingConfig(top_k=4, renormalize=True), False),
    "softmax_plain": (RoutingConfig(top_k=2, renormalize=False), False),
    "softmax_after_topk": (RoutingConfig(top_k=4, softmax_after_topk=True), False),
    "sigmoid_bias_groups": (RoutingConfig(top_k=6, scoring="sigmoid", renormalize=True, num_groups=4,
                                          topk_groups=2, routed_scaling_factor=2.5), True),
    "softmax_groups_by_max": (RoutingConfig(top_k=3, renormalize=False, num_groups=4, topk_groups=2,
                                            routed_scaling_factor=16.0), False),
    "sigmoid_bias_scaled": (RoutingConfig(top_k=6, scoring="sigmoid", routed_scaling_factor=2.5), True),
}


@pytest.mark.parametrize("case", list(ROUTING_CASES))
def test_select_experts_matches_per_token_reference(case):
    cfg, use_bias = ROUTING_CASES[case]
    g = torch.Generator().manual_seed(0)
    tokens, num_experts = 50, 16
    logits = torch.randn(tokens, num_experts, generator=g) * 2
    bias = torch.randn(num_experts, generator=g) * 0.5 if use_bias else None
    weights, ids = select_experts(logits.to(DEVICE), cfg, None if bias is None else bias.to(DEVICE))
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (tokens, cfg.top_k)
    grouping_changed_choice = False
    for t in range(tokens):
        ref_w, ref_ids = reference_route(logits[t].tolist(), cfg, None if bias is None else bias.tolist())
        assert ids[t].tolist() == ref_ids
        assert weights[t].cpu().tolist() == pytest.approx(ref_w, rel=1e-5, abs=1e-6)
        if cfg.num_groups > 1:
            ungrouped = RoutingConfig(**{**cfg.__dict__, "num_groups": 1, "topk_groups": 1})
            grouping_changed_choice |= reference_route(logits[t].tolist(), ungrouped,
                                                       None if bias is None else bias.tolist())[1] != ref_ids
    if cfg.num_groups > 1:
        assert grouping_changed_choice  # the data exercises the group limit


@pytest.mark.parametrize("case", [c for c, (cfg, _) in ROUTING_CASES.items() if cfg.num_groups == 1])
@pytest.mark.parametrize("num_experts", [16, 60])
def test_fused_routing_kernel_matches_per_token_reference(case, num_experts):
    """The one-kernel routing CUDA takes (topk_triton.py), on the interpreter here."""
    cfg, use_bias = ROUTING_CASES[case]
    g = torch.Generator().manual_seed(1)
    tokens = 37
    logits = torch.randn(tokens, num_experts, generator=g) * 2
    bias = torch.randn(num_experts, generator=g) * 0.5 if use_bias else None
    weights, ids = select_experts_triton(logits.to(DEVICE, torch.bfloat16), cfg,
                                         None if bias is None else bias.to(DEVICE))
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    logits = logits.to(torch.bfloat16).float()  # what the kernel read
    for t in range(tokens):
        ref_w, ref_ids = reference_route(logits[t].tolist(), cfg, None if bias is None else bias.tolist())
        assert ids[t].tolist() == ref_ids
        assert weights[t].cpu().tolist() == pytest.approx(ref_w, rel=1e-5, abs=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, on the interpreter's NaN maxima
def test_fused_routing_keeps_ids_in_range_on_nan_logits():
    """A diverged row must not send the experts' kernels outside the weights."""
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))
    logits[0] = float("nan")
    logits[1, ::2] = float("nan")
    for cfg, _ in ROUTING_CASES.values():
        if cfg.num_groups == 1:
            _, ids = select_experts_triton(logits.to(DEVICE), cfg)
            assert ((ids >= 0) & (ids < 12)).all()
            reference = reference_route(logits[2].tolist(), cfg, None)[1]
            assert ids[2].tolist() == reference  # the finite row as before


def test_fused_routing_refuses_expert_groups():
    cfg, _ = ROUTING_CASES["softmax_groups_by_max"]
    with pytest.raises(ValueError, match="group"):
        select_experts_triton(torch.randn(2, 16, device=DEVICE), cfg)


# ---- GPU -----------------------------------------------------------------

QWEN3_30B_A3B = dict(hidden=2048, inter=768, experts=128, top_k=8)


def _qwen_layer(tokens: int, dtype: torch.dtype, seed: int):
    shape = QWEN3_30B_A3B
    w13, w2, _, _ = random_experts(shape["experts"], shape["hidden"], shape["inter"], dtype, seed, bias=False)
    g = torch.Generator().manual_seed(seed + 1)
    logits = torch.randn(tokens, shape["experts"], generator=g).to(DEVICE)
    weights, ids = select_experts(logits, RoutingConfig(top_k=shape["top_k"]))
    hidden = torch.randn(tokens, shape["hidden"], generator=g).to(DEVICE, dtype)
    return hidden, w13, w2, weights, ids


@pytest.mark.parametrize("tokens", [1, 8, 64, 1000])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_qwen3_moe_layer_shape_on_gpu(tokens, dtype, tol):
    hidden, w13, w2, weights, ids = _qwen_layer(tokens, dtype, seed=tokens)
    out = fused_experts_triton(hidden, w13, w2, weights, ids, SILU)
    assert rel(out, fused_experts_torch(hidden, w13, w2, weights, ids, SILU)) < tol


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_no_host_sync_and_cuda_graph_replay_with_new_routing():
    """Captured once, the graph gives the right answer for routing it never saw."""
    hidden, w13, w2, weights, ids = _qwen_layer(4, torch.bfloat16, seed=0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_experts_triton(hidden, w13, w2, weights, ids, SILU)  # compiles; must not sync
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts_triton(hidden, w13, w2, weights, ids, SILU)
    new_hidden, _, _, new_weights, new_ids = _qwen_layer(4, torch.bfloat16, seed=1)
    for captured, new in ((hidden, new_hidden), (weights, new_weights), (ids, new_ids)):
        captured.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert rel(out, fused_experts_torch(hidden, w13, w2, weights, ids, SILU)) < 2e-2
