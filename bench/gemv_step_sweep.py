"""The one-row GEMV's tiles timed inside a whole decode step (needs CUDA).

    python bench/gemv_step_sweep.py --tokenizer-dir DIR [--model llama8b] [--format fp8] [key=value ...]

A GEMV timed alone (bench/gemv_bench.py) runs back to back with copies of
itself; inside a step it runs between norms and attention, with programmatic
dependent launch, and tiles that win alone have lost there (an FP8 choice of
the sweep alone gave a slower step). So this builds one batch-1 decode step
(bench/profile_decode.py's, dummy weights) and, for each candidate tiles of
the GEMVs with K under `--large-k` and then of those with K from it, captures
the step's CUDA graph again and times its replay. The other class keeps the
defaults (gemv.gemv_tiles). The best of each class is then timed together
against the defaults, alternated. Prints a table; --out writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_decode import cuda_ms, decode_setup, decode_step  # noqa: E402
from radixserve.layers import gemv as gemv_module  # noqa: E402
from radixserve.layers.gemv import GemvTiles  # noqa: E402

DEFAULT_TILES = gemv_module.gemv_tiles
# block_n, block_k, num_warps, num_stages
CANDIDATES = {
    "small": ["8,512,4,3", "8,1024,4,3", "8,1024,8,3", "16,512,8,3", "16,1024,8,2", "16,1024,8,1",
              "32,512,8,1", "8,2048,8,1", "4,1024,4,3"],
    "large": ["8,512,8,3", "8,1024,8,3", "16,512,8,3", "16,1024,8,3", "16,1024,8,1", "32,512,8,1",
              "8,2048,8,1", "4,2048,8,2"],
}


def parse(spec: str) -> GemvTiles:
    bn, bk, w, st = (int(v) for v in spec.split(","))
    return GemvTiles(block_n=bn, block_k=bk, num_warps=w, num_stages=st)


def use_tiles(weight_bytes: int, large_k: int, small: Optional[GemvTiles] = None,
              large: Optional[GemvTiles] = None) -> None:
    """gemv_tiles answering `small`/`large` for weights of weight_bytes (None: the default)."""
    def tiles(k: int, wb: int) -> GemvTiles:
        pick = (large if k >= large_k else small) if wb == weight_bytes else None
        if pick is None:
            return DEFAULT_TILES(k, wb)
        return GemvTiles(pick.block_n, min(pick.block_k, 1 << (k - 1).bit_length()), pick.num_warps, pick.num_stages)
    gemv_module.gemv_tiles = tiles


def step_ms(runner, fb):
    """The batch-1 decode graph captured again with the current tiles: its
    replay's milliseconds and its logits (float32, a copy)."""
    runner.graph_runners = []
    torch.cuda.empty_cache()
    runner.graph_runners = runner._make_plain_graph_runners()
    ms = cuda_ms(lambda: runner.graph_runners[0].replay(fb), 200)
    return ms, runner.graph_runners[0].replay(fb).next_token_logits.float().clone()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-dir", required=True)
    p.add_argument("--model", default="llama8b")
    p.add_argument("--format", default="fp8", choices=["fp8", "bf16"], help="whose tiles to sweep")
    p.add_argument("--large-k", type=int, default=8192)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--out")
    p.add_argument("server_args", nargs="*", help="key=value ServerArgs fields (quantization=fp8 for --format fp8)")
    a = p.parse_args()
    extra = dict(arg.split("=", 1) for arg in a.server_args)
    if a.format == "fp8":
        extra.setdefault("quantization", "fp8")
    extra.update(cuda_graph_max_bs=1, prefill_cuda_graph_max_tokens=0)  # only the batch-1 decode graph
    weight_bytes = 1 if a.format == "fp8" else 2
    runner, batch = decode_setup(a.model, a.tokenizer_dir, extra, 1, a.context)
    fb = decode_step(runner, batch)
    rows = []
    base, reference = step_ms(runner, fb)
    rows.append({"class": "default", "tiles": None, "ms": base})
    best = {}
    for cls in ("small", "large"):
        for spec in CANDIDATES[cls]:
            tiles = parse(spec)
            use_tiles(weight_bytes, a.large_k, **{cls: tiles})
            try:
                ms, logits = step_ms(runner, fb)
            except Exception as e:  # a tile the kernel cannot take (shared memory): recorded, skipped
                rows.append({"class": cls, "tiles": spec, "error": repr(e)[:200]})
                continue
            # Another summation order moves the logits by rounding only: a wrong tile would move them far.
            diff = rel_diff(logits, reference)
            rows.append({"class": cls, "tiles": spec, "ms": ms, "logits_rel_diff": diff})
            print(f"{cls:6s} {spec:14s} {ms:.4f} ms  logits rel. diff {diff:.1e}", flush=True)
            if diff > 0.1:  # (random weights over 32 layers amplify rounding; an indexing error gives ~1)
                continue
            if ms < best.get(cls, (None, float("inf")))[1]:
                best[cls] = (spec, ms)
    chosen = {cls: parse(spec) for cls, (spec, _) in best.items()}
    pairs = []
    for _ in range(3):
        use_tiles(weight_bytes, a.large_k)
        d = step_ms(runner, fb)[0]
        use_tiles(weight_bytes, a.large_k, **chosen)
        pairs.append((d, step_ms(runner, fb)[0]))
    result = {"model": a.model, "format": a.format, "device": torch.cuda.get_device_name(),
              "server_args": extra, "rows": rows, "best": {c: s for c, (s, _) in best.items()},
              "default_vs_best_ms": pairs}
    print(json.dumps({"best": result["best"], "default_vs_best_ms": pairs}))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
