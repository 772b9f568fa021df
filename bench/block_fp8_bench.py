"""Block-scaled FP8 (DeepSeek-V3's 128 x 128 blocks) against bfloat16 on one GPU:
each DeepSeek-V3 linear (tp=1) and a layer's routed experts (32 of them, 8 per
token: an expert-parallel rank's share), at a decode's and a prefill's row
counts, timed inside a CUDA graph, with the weight bytes per second reached
and the error against the dequantized weight's product.

    python bench/block_fp8_bench.py [--rows 1,16,64,300,2048] [--out block_fp8.json] [--sweep]

Ways: bf16 (F.linear, cuBLAS, on the dequantized weight in bfloat16) and
block-fp8 (layers/block_fp8.block_fp8_linear: the GEMV for one row, the
weight-only GEMM up to 16 rows, activation quantization + the FP8 GEMM above);
for the experts, the fused MoE kernel on bfloat16 and on block-FP8 weights.
Prints one table; about 30 s on an H200. --sweep then times every tile
configuration of the GEMM (block_fp8_kernels.BlockGemmTiles) for each linear
at each row count above one and prints the best (minutes: each one compiles).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from radixserve.layers import block_fp8_kernels  # noqa: E402
from radixserve.layers.block_fp8 import (  # noqa: E402
    WEIGHT_ONLY_MAX_ROWS, block_fp8_linear, dequantize_block_fp8, quantize_block_fp8,
)
from radixserve.layers.moe.activation import ExpertActivation  # noqa: E402
from radixserve.layers.moe.fused_moe_triton import fused_experts_triton  # noqa: E402
from radixserve.layers.moe.layer import ExpertBlockScales  # noqa: E402

BLOCK = (128, 128)
# (name, out, in) of DeepSeek-V3's linears at tp=1
DEEPSEEK_V3_LINEARS = [
    ("q_a", 1536, 7168), ("q_b", 24576, 1536), ("kv_a", 576, 7168), ("o", 7168, 16384),
    ("dense gate_up", 36864, 7168), ("dense down", 7168, 18432),
    ("shared gate_up", 4096, 7168), ("shared down", 7168, 2048),
]
EXPERTS, TOP_K, HIDDEN, INTER = 32, 8, 7168, 2048


def graph_time_us(fn) -> float:
    """Median microseconds of fn() replayed in a CUDA graph."""
    return triton.testing.do_bench_cudagraph(fn, rep=30) * 1000


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_linear(name: str, n: int, k: int, rows_list) -> list:
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    wq, ws = quantize_block_fp8(w, BLOCK)
    dense = dequantize_block_fp8(wq, ws, BLOCK).to(torch.bfloat16)
    del w
    results = []
    for rows in rows_list:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        bf16_us = graph_time_us(lambda: torch.nn.functional.linear(x, dense))
        fp8_us = graph_time_us(lambda: block_fp8_linear(x, wq, ws, None, BLOCK))
        err = rel(block_fp8_linear(x, wq, ws, None, BLOCK), x.float() @ dense.float().T)
        results.append(dict(what=f"{name} {n}x{k}", rows=rows, bf16_us=bf16_us, fp8_us=fp8_us,
                            fp8_weight_gbs=wq.numel() / fp8_us / 1e3, rel_err=err))
    return results


def sweep_tiles(n: int, k: int, rows: int) -> tuple:
    """(microseconds, tiles) of the fastest GEMM tiles for rows x [n, k], as block_fp8_linear calls it."""
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    wq, ws = quantize_block_fp8(w, BLOCK)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    xq, xs = (x, None) if rows <= WEIGHT_ONLY_MAX_ROWS else block_fp8_kernels.quantize_groups_fp8(x, BLOCK[1])
    best = (float("inf"), None)
    for bm, bn, (warps, stages) in itertools.product([16, 32, 64, 128], [16, 32, 64, 128],
                                                      [(4, 3), (4, 4), (8, 3)]):
        if bm > 16 and rows <= WEIGHT_ONLY_MAX_ROWS:
            continue
        tiles = block_fp8_kernels.BlockGemmTiles(bm, bn, warps, stages)
        try:
            us = graph_time_us(lambda: block_fp8_kernels.block_fp8_matmul(xq, xs, wq, ws, BLOCK, x.dtype, None, tiles))
        except Exception as exc:  # a tile too large for shared memory
            print(f"  {tiles}: {type(exc).__name__}")
            continue
        best = min(best, (us, tiles), key=lambda r: r[0])
    return best


def bench_experts(rows_list) -> list:
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device="cuda") / HIDDEN ** 0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, device="cuda") / INTER ** 0.5
    (q13, s13), (q2, s2) = quantize_block_fp8(w13, BLOCK), quantize_block_fp8(w2, BLOCK)
    del w13, w2
    d13 = dequantize_block_fp8(q13, s13, BLOCK).to(torch.bfloat16)
    d2 = dequantize_block_fp8(q2, s2, BLOCK).to(torch.bfloat16)
    scales = ExpertBlockScales(s13, s2, BLOCK)
    silu = ExpertActivation("silu")
    results = []
    for rows in rows_list:
        x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(EXPERTS, device="cuda")[:TOP_K] for _ in range(rows)]).int()
        weights = torch.rand(rows, TOP_K, device="cuda")
        bf16_us = graph_time_us(lambda: fused_experts_triton(x, d13, d2, weights, ids, silu))
        fp8_us = graph_time_us(lambda: fused_experts_triton(x, q13, q2, weights, ids, silu, block_scales=scales))
        err = rel(fused_experts_triton(x, q13, q2, weights, ids, silu, block_scales=scales),
                  fused_experts_triton(x.float(), d13.float(), d2.float(), weights, ids, silu))
        touched = min(EXPERTS, rows * TOP_K) / EXPERTS  # the share of experts a batch reads
        results.append(dict(what=f"experts {EXPERTS}x(2x{INTER})x{HIDDEN} top{TOP_K}", rows=rows,
                            bf16_us=bf16_us, fp8_us=fp8_us,
                            fp8_weight_gbs=(q13.numel() + q2.numel()) * touched / fp8_us / 1e3, rel_err=err))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,16,64,300,2048")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--sweep", action="store_true", help="then sweep the GEMM's tiles per shape")
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    for name, n, k in DEEPSEEK_V3_LINEARS:
        results += bench_linear(name, n, k, rows_list)
    results += bench_experts(rows_list)
    print(f"{torch.cuda.get_device_name()}, blocks {BLOCK}; microseconds in a CUDA graph")
    print(f"{'weight':<42} {'rows':>5} {'bf16':>9} {'block-fp8':>10} {'speedup':>8} {'fp8 GB/s':>9} {'rel err':>8}")
    for r in results:
        print(f"{r['what']:<42} {r['rows']:>5} {r['bf16_us']:>9.1f} {r['fp8_us']:>10.1f} "
              f"{r['bf16_us'] / r['fp8_us']:>7.2f}x {r['fp8_weight_gbs']:>9.0f} {r['rel_err']:>8.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    if args.sweep:
        print("best GEMM tiles (default: block_fp8_kernels.block_gemm_tiles)")
        for (name, n, k), rows in itertools.product(DEEPSEEK_V3_LINEARS, [r for r in rows_list if r > 1]):
            us, tiles = sweep_tiles(n, k, rows)
            print(f"{name + f' {n}x{k}':<42} {rows:>5} {us:>9.1f} us  {tiles}  "
                  f"(default {block_fp8_kernels.block_gemm_tiles(rows, n)})")


if __name__ == "__main__":
    main()
