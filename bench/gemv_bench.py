"""One row times a weight on one GPU, as a batch-1 decode step does it: cuBLAS
(F.linear, bfloat16) against layers/gemv.py (bfloat16 and FP8 weights), timed
inside a CUDA graph, with the weight bytes per second each reaches.

    python bench/gemv_bench.py --out gemv.json [--sweep] [--shapes llama8b,qwen0.6b]

Each timing cycles through enough copies of the weight (256 MB in all) that
none stays in the L2 cache, as in a decode step, which reads every layer once.
--sweep also times every tile configuration in SPACE and prints the best three.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from radixserve.layers import gemv as gemv_module  # noqa: E402
from radixserve.layers.quantization import quantize_per_row  # noqa: E402

# (name, out, in) of one layer's linears
SHAPES = {
    "llama8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
    "qwen0.6b": [("qkv", 4096, 1024), ("o", 1024, 2048), ("gate_up", 6144, 1024), ("down", 1024, 3072)],
    "qwen30b-a3b": [("qkv", 5120, 2048), ("o", 2048, 4096)],
    "deepseek-v2-lite": [("q", 3072, 2048), ("kv_a", 576, 2048), ("kv_b", 4096, 512), ("o", 2048, 2048),
                         ("gate_up", 21888, 2048), ("down", 2048, 10944)],
}
# block_n, block_k, num_warps
SPACE = list(itertools.product([2, 4, 8, 16], [256, 512, 1024, 2048], [2, 4, 8]))
ROTATE_BYTES = 128 << 20  # over twice an H200's L2


def time_us(fn, copies: int) -> float:
    """Median microseconds of one call of fn(i), from one CUDA graph of fn(0),
    ..., fn(copies - 1) replayed 10 times per sample."""
    def run_all():
        for i in range(copies):
            fn(i)
    run_all()  # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(7):
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 10)
    return statistics.median(samples) * 1000 / copies


def weights(n: int, k: int, fmt: str, g: torch.Generator):
    """(weights, scales or None) for `copies` copies of an [n, k] weight in fmt."""
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) / 64
    if fmt == "fp8":
        wq, ws = quantize_per_row(w)
        return wq, ws.view(-1)
    return w, None


def sweep(x, ws, ss, copies: int) -> list:
    results = []
    for bn, bk, warps in SPACE:
        tiles = gemv_module.GemvTiles(bn, bk, warps)
        try:
            us = time_us(lambda i: gemv_module.gemv(x, ws[i], ss[i], None, tiles), copies)
        except Exception as exc:  # a tile too large for the registers or shared memory
            print(f"  skip {tiles}: {type(exc).__name__}", flush=True)
            continue
        results.append({"tiles": [bn, bk, warps], "us": round(us, 2)})
    return sorted(results, key=lambda r: r["us"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="llama8b,qwen0.6b")
    p.add_argument("--formats", default="bf16,fp8")
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    records = []
    for model in args.shapes.split(","):
        for name, n, k in SHAPES[model]:
            x = torch.randn(1, k, device="cuda", generator=g, dtype=torch.bfloat16)
            for fmt in args.formats.split(","):
                nbytes = n * k * (1 if fmt == "fp8" else 2)
                copies = max(1, math.ceil(ROTATE_BYTES / nbytes))
                pairs = [weights(n, k, fmt, g) for _ in range(copies)]
                ws, ss = [w for w, _ in pairs], [s for _, s in pairs]
                tiles = gemv_module.gemv_tiles(k, ws[0].element_size())
                record = {"model": model, "linear": name, "out": n, "in": k, "format": fmt,
                          "default_tiles": list(vars(tiles).values())}
                ways = {"gemv": lambda i: gemv_module.gemv(x, ws[i], ss[i])}
                if fmt == "bf16":
                    ways["cublas"] = lambda i: torch.nn.functional.linear(x, ws[i])
                    record["gemv_preferred"] = gemv_module.prefer_over_cublas(ws[0])
                for way, fn in ways.items():
                    us = time_us(fn, copies)
                    record[way] = {"us": round(us, 2), "GB/s": round(nbytes / us / 1e3)}
                if args.sweep:
                    record["sweep_best"] = sweep(x, ws, ss, copies)[:3]
                records.append(record)
                line = "  ".join(f"{w} {record[w]['us']:6.1f} us ({record[w]['GB/s']:5d} GB/s)" for w in ways)
                print(f"{model:10s} {name:8s} {fmt:5s} {line}  default {record['default_tiles']}", flush=True)
                if args.sweep:
                    print("   best:", record["sweep_best"], flush=True)
    Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "records": records}, indent=1))


if __name__ == "__main__":
    main()
