"""The FP8 linear of a decode step on one GPU: each way to multiply a few rows by
a Llama-3.1-8B layer's weights, timed inside a CUDA graph (as a decode step
runs), with the weight bytes per second it reaches.

    python bench/fp8_gemm_bench.py --out fp8_gemm.json [--rows 1,8,16,32,64] [--sweep]

Ways: bf16 (F.linear on bfloat16 weights), torch-quant (quantize_per_row in
torch, then torch._scaled_mm: the path before fp8_kernels), fused-quant
(fp8_kernels.quantize_rows_fp8, then torch._scaled_mm), weight-only
(fp8_kernels.fp8_weight_only_matmul with its default tiles; one row:
layers/gemv.py, which bench/gemv_bench.py sweeps). --sweep also times every
tile configuration of the weight-only kernel at 16 rows and prints the best.
The weights are not rotated, so the smaller ones may be read from the L2
cache (gemv_bench.py rotates them).
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

from radixserve.layers import fp8_kernels, gemv  # noqa: E402
from radixserve.layers.quantization import quantize_per_row  # noqa: E402

# (name, out, in) of one Llama-3.1-8B layer's linears
LLAMA8B_LINEARS = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]


def graph_time_us(fn) -> float:
    """Median microseconds of fn() replayed in a CUDA graph."""
    return triton.testing.do_bench_cudagraph(fn, rep=50) * 1000


def torch_quant_scaled_mm(x, wq, ws):
    xq, xs = quantize_per_row(x)
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=x.dtype)


def fused_quant_scaled_mm(x, wq, ws):
    xq, xs = fp8_kernels.quantize_rows_fp8(x)
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=x.dtype)


def sweep(x, wq, ws) -> list:
    """Every tile configuration of the weight-only kernel."""
    results = []
    space = itertools.product([16, 32, 64], [128, 256, 512], [4], [3, 4])
    for bn, bk, warps, stages in space:
        tiles = fp8_kernels.WeightOnlyTiles(bn, bk, warps, stages)
        try:
            us = graph_time_us(lambda: fp8_kernels.fp8_weight_only_matmul(x, wq, ws, None, tiles))
        except Exception as exc:  # a tile too large for shared memory
            print(f"  skip {tiles}: {type(exc).__name__}")
            continue
        results.append({"tiles": [bn, bk, warps, stages], "us": us})
    return sorted(results, key=lambda r: r["us"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rows", default="1,8,16,32,64")
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    g = torch.Generator(device="cuda").manual_seed(0)
    records = []
    for name, n, k in LLAMA8B_LINEARS:
        w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) / 64
        wq, ws = quantize_per_row(w)
        ws = ws.view(-1)
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", generator=g, dtype=torch.bfloat16)
            ways = {
                "bf16": lambda: torch.nn.functional.linear(x, w),
                "torch-quant": lambda: torch_quant_scaled_mm(x, wq, ws),
                "fused-quant": lambda: fused_quant_scaled_mm(x, wq, ws),
                "weight-only": (lambda: gemv.gemv(x, wq, ws)) if rows == 1
                else (lambda: fp8_kernels.fp8_weight_only_matmul(x, wq, ws)),
            }
            record = {"linear": name, "out": n, "in": k, "rows": rows}
            for way, fn in ways.items():
                us = graph_time_us(fn)
                weight_bytes = n * k * (2 if way == "bf16" else 1)
                record[way] = {"us": round(us, 2), "GB/s": round(weight_bytes / us / 1e3, 1)}
            if args.sweep and rows == 16:
                best = sweep(x, wq, ws)[:3]
                record["sweep_best"] = best
            records.append(record)
            line = "  ".join(f"{way} {record[way]['us']:7.1f} us ({record[way]['GB/s']:6.0f} GB/s)" for way in ways)
            print(f"{name:8s} rows {rows:3d}  {line}", flush=True)
            if "sweep_best" in record:
                print("   best tiles:", record["sweep_best"], flush=True)
    Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "records": records}, indent=1))


if __name__ == "__main__":
    main()
