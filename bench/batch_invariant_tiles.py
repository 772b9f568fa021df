"""Tile sweep of the batch-invariant linear (layers/batch_invariant.py) at the
Qwen3-0.6B projection shapes, against cuBLAS (runs on CUDA only).

    python3 bench/batch_invariant_tiles.py

Prints, per tile configuration, the milliseconds of one model step's
projections (28 layers of q|k|v, o, gate|up, down, plus the LM head on up to
256 rows) at 1, 64, 256, 2048 and 8192 rows; the last line is the whole result as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from radixserve.layers.batch_invariant import _linear_kernel  # noqa: E402

LAYERS = 28
SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}
LM_HEAD = (151936, 1024)
ROWS = [1, 64, 256, 2048, 8192]
CONFIGS = [(64, 64, 64, 4, 3), (32, 32, 128, 4, 3), (64, 32, 128, 4, 3), (16, 64, 128, 4, 4),
           (32, 64, 128, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 8, 3), (64, 64, 64, 4, 4),
           (64, 128, 64, 4, 3), (64, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
           (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (128, 128, 32, 8, 4)]


def step_ms(linear, weights, rows: int) -> float:
    xs = {k: torch.randn(rows, w.shape[1], device="cuda", dtype=torch.bfloat16) for k, w in weights.items()}

    def step() -> None:
        for name in SHAPES:
            for _ in range(LAYERS):
                linear(xs[name], weights[name])
        linear(xs["lm_head"][: min(rows, 256)], weights["lm_head"])

    step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end))
    return round(best, 3)


def tiled_linear(bm: int, bn: int, bk: int, warps: int, stages: int):
    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        m, k = x.shape
        out = torch.empty((m, w.shape[0]), dtype=x.dtype, device=x.device)
        grid = (-(-m // bm), -(-w.shape[0] // bn))
        _linear_kernel[grid](x, w, w, out, m, w.shape[0], k, x.stride(0), w.stride(0), out.stride(0),
                             HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=False,
                             num_warps=warps, num_stages=stages)
        return out
    return linear


def main() -> None:
    shapes = {**SHAPES, "lm_head": LM_HEAD}
    weights = {k: torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) * 0.02 for k, (n, kk) in shapes.items()}
    results = {"cublas": [step_ms(torch.nn.functional.linear, weights, r) for r in ROWS]}
    print("cublas", results["cublas"], flush=True)
    for bm, bn, bk, warps, stages in CONFIGS:
        key = f"{bm}x{bn}x{bk} w{warps} s{stages}"
        results[key] = [step_ms(tiled_linear(bm, bn, bk, warps, stages), weights, r) for r in ROWS]
        print(key, results[key], flush=True)
    print(json.dumps({"rows": ROWS, "ms_per_step": results}))


if __name__ == "__main__":
    main()
