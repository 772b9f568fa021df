"""The fused MoE Triton kernel against the plain-torch experts, one MoE layer.

    python bench/moe_kernel_bench.py --out moe_kernel.json            # CUDA: Qwen3-30B-A3B layer
    python bench/moe_kernel_bench.py --smoke --out moe_smoke.json     # tiny, CPU (Triton interpreter)
    python bench/moe_kernel_bench.py --tokens 1 --compare-paths 1 2 4 8 [--tile-grid] [--layers 4] --out x.json
    python bench/moe_kernel_bench.py --shape deepseek-v2-lite ...  # H=2048, I=1408, E=64, top-6

The layer (default): H=2048, I=768, E=128, top-8, bf16, random weights scaled by
1/sqrt(fan_in) (the size of a trained model's), hidden states ~ N(0, 1) as
after RMSNorm, softmax top-8 renormalised routing from random logits. For each
token count T: the error of the Triton path against the torch path (max |diff| /
max |torch| and the norm ratio), the median time of each (CUDA events after a
warmup; the Triton path also replayed from a CUDA graph, as decode runs it),
and the Triton path's achieved bandwidth (bytes of the experts the batch
touches plus activations in and out, over its time) and TFLOP/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

import torch


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    inter: int
    experts: int
    top_k: int
    dtype: torch.dtype


QWEN3_30B_A3B = LayerShape(hidden=2048, inter=768, experts=128, top_k=8, dtype=torch.bfloat16)
DEEPSEEK_V2_LITE = LayerShape(hidden=2048, inter=1408, experts=64, top_k=6, dtype=torch.bfloat16)
SHAPES = {"qwen3-30b-a3b": QWEN3_30B_A3B, "deepseek-v2-lite": DEEPSEEK_V2_LITE}
SMOKE = LayerShape(hidden=64, inter=48, experts=8, top_k=2, dtype=torch.bfloat16)
TOKENS = (1, 8, 64, 256, 1024, 4096)
SMOKE_TOKENS = (1, 8, 33)


def make_layer(shape: LayerShape, tokens: int, device: torch.device, seed: int = 0):
    from radixserve.layers.moe.topk import RoutingConfig, select_experts

    g = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *size: torch.randn(*size, generator=g, device=device)  # noqa: E731
    w13 = (randn(shape.experts, 2 * shape.inter, shape.hidden) / shape.hidden ** 0.5).to(shape.dtype)
    w2 = (randn(shape.experts, shape.hidden, shape.inter) / shape.inter ** 0.5).to(shape.dtype)
    hidden = randn(tokens, shape.hidden).to(shape.dtype)
    weights, ids = select_experts(randn(tokens, shape.experts), RoutingConfig(top_k=shape.top_k))
    return hidden, w13, w2, weights, ids


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_replay_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """fn captured once in a CUDA graph, then timed by replays (as decode runs it)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm the allocator outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, torch.device("cuda"), warmup, iters)


@contextlib.contextmanager
def few_token_path(max_tokens: int, gate_up=None, down=None):
    """Run fused_experts_triton with the few-token GEMVs up to max_tokens tokens
    (0: never; the grouped GEMM), with the given tiles for their kernels."""
    from radixserve.layers.moe import few_token_experts as fte

    saved = fte.FEW_TOKENS_MAX, fte.gate_up_tiles, fte.down_tiles
    fte.FEW_TOKENS_MAX = max_tokens
    if gate_up is not None:
        fte.gate_up_tiles = lambda hidden_size: gate_up
    if down is not None:
        fte.down_tiles = lambda inter: down
    try:
        yield
    finally:
        fte.FEW_TOKENS_MAX, fte.gate_up_tiles, fte.down_tiles = saved


def tile_variants() -> List[tuple]:
    """(name, gate_up tiles, down tiles): down's tiles swept with gate_up's
    default, then gate_up's with down's default."""
    from radixserve.layers.gemv import GemvTiles

    downs = [("down", None, GemvTiles(n, k, w)) for n in (1, 2, 4) for k in (128, 256, 512) for w in (4, 8)
             if n * k <= 1024]
    gate_ups = [("gate_up", GemvTiles(n, k, 4, stages), None) for n in (1, 2, 4) for k in (512, 1024)
                for stages in (1, 2)]
    return [(f"few_tokens {part} {t.block_n},{t.block_k},{t.num_warps},{t.num_stages}", g, d)
            for part, g, d in downs + gate_ups for t in [g or d]]


def compare_paths(shape: LayerShape, tokens: int, warmup: int, iters: int, tile_grid: bool,
                  layers: int = 1) -> List[Dict]:
    """CUDA-graph ms of one layer's experts at `tokens` tokens: the grouped GEMM,
    the few-token GEMVs at their default tiles and, with tile_grid, at others.
    layers: one graph runs this many layers of their own weights in turn and
    the time is its replay over `layers` (as a model's step runs them: the
    graph's launch is shared, and no layer finds the last one's weights in L2)."""
    from radixserve.layers.moe.activation import ExpertActivation
    from radixserve.layers.moe.fused_moe_triton import fused_experts_triton

    stack = [make_layer(shape, tokens, torch.device("cuda"), seed=tokens * 1000 + i) for i in range(layers)]
    silu = ExpertActivation("silu")

    def run() -> None:
        for hidden, w13, w2, weights, ids in stack:
            fused_experts_triton(hidden, w13, w2, weights, ids, silu)

    rows = []
    variants = [("grouped", 0, None, None), ("few_tokens", 1 << 30, None, None)]
    if tile_grid:
        variants += [(name, 1 << 30, g, d) for name, g, d in tile_variants()]
    for name, max_tokens, gate_up, down in variants:
        with few_token_path(max_tokens, gate_up, down):
            rows.append({"tokens": tokens, "path": name, "layers": layers,
                         "graph_ms": graph_replay_ms(run, warmup, iters) / layers})
        print(rows[-1], flush=True)
    return rows


def bench_tokens(shape: LayerShape, tokens: int, device: torch.device, warmup: int, iters: int) -> Dict:
    from radixserve.layers.moe.activation import ExpertActivation
    from radixserve.layers.moe.fused_moe_triton import fused_experts_triton
    from radixserve.layers.moe.torch_experts import fused_experts_torch

    hidden, w13, w2, weights, ids = make_layer(shape, tokens, device, seed=tokens)
    act = ExpertActivation("silu")
    run_triton = lambda: fused_experts_triton(hidden, w13, w2, weights, ids, act)  # noqa: E731
    run_torch = lambda: fused_experts_torch(hidden, w13, w2, weights, ids, act)  # noqa: E731
    ours, ref = run_triton().float(), run_torch().float()
    diff = (ours - ref).abs()

    triton_ms = median_ms(run_triton, device, warmup, iters)
    torch_ms = median_ms(run_torch, device, warmup, iters)
    graph_ms = graph_replay_ms(run_triton, warmup, iters) if device.type == "cuda" else None

    item = w13.element_size()
    experts_touched = int(ids.unique().numel())
    expert_bytes = 3 * shape.inter * shape.hidden * item
    bytes_moved = experts_touched * expert_bytes + 2 * tokens * shape.hidden * item
    flops = 2 * tokens * shape.top_k * 3 * shape.inter * shape.hidden
    best_ms = min(triton_ms, graph_ms) if graph_ms is not None else triton_ms
    return {
        "tokens": tokens,
        "experts_touched": experts_touched,
        "max_rel_err": (diff.max() / ref.abs().max()).item(),
        "norm_rel_err": (diff.norm() / ref.norm()).item(),
        "triton_ms": triton_ms,
        "triton_graph_ms": graph_ms,
        "torch_ms": torch_ms,
        "speedup_vs_torch": torch_ms / best_ms,
        "triton_GBps": bytes_moved / (best_ms * 1e-3) / 1e9,
        "triton_TFLOPs": flops / (best_ms * 1e-3) / 1e12,
    }


def print_table(rows: List[Dict]) -> None:
    cols = ["tokens", "experts_touched", "max_rel_err", "triton_ms", "triton_graph_ms", "torch_ms",
            "speedup_vs_torch", "triton_GBps", "triton_TFLOPs"]
    print(" | ".join(f"{c:>15}" for c in cols))
    for row in rows:
        cells = []
        for c in cols:
            v = row[c]
            cells.append(f"{'-':>15}" if v is None else f"{v:>15.4g}" if isinstance(v, float) else f"{v:>15}")
        print(" | ".join(cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="where to write the JSON results")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, Triton interpreted")
    p.add_argument("--tokens", type=int, nargs="*", help="token counts (default: 1 8 64 256 1024 4096)")
    p.add_argument("--compare-paths", type=int, nargs="*", default=[],
                   help="CUDA: token counts at which to time the grouped GEMM against the few-token GEMVs")
    p.add_argument("--tile-grid", action="store_true", help="with --compare-paths: the GEMVs' tiles too")
    p.add_argument("--layers", type=int, default=4,
                   help="with --compare-paths: layers of their own weights in one graph (time per layer)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b", help="one MoE layer's shape")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            raise SystemExit("the full benchmark needs CUDA; use --smoke on a CPU")
        # Before any kernel module is imported: Triton picks the interpreter at decoration.
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if cuda else "cpu")
    shape = SMOKE if args.smoke else SHAPES[args.shape]
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    warmup, iters = (1, 3) if args.smoke else (args.warmup, args.iters)

    rows = [bench_tokens(shape, t, device, warmup, iters) for t in tokens]
    print_table(rows)
    paths = [r for t in args.compare_paths
             for r in compare_paths(shape, t, warmup, iters, args.tile_grid, args.layers)] if cuda else []
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
        "shape": {**asdict(shape), "dtype": str(shape.dtype)},
        "smoke": args.smoke,
        "results": rows,
        "paths": paths,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
