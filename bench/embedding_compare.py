"""Embedding throughput: our --is-embedding Engine against transformers, same
random weights, same run.

    python bench/embedding_compare.py [--model qwen0.6b[:LAYERS]] [--num-requests 256]
        [--input-len 256] [--hf-batch 32] [--device cpu|cuda] [--out results.json]

The checkpoint is Qwen3-Embedding's layout (a bare Qwen3 decoder, last-token
pooling declared in sentence-transformers' files) with random weights of the
shape bench_shapes.py names, saved once under --work-dir. Each side embeds
num_requests prompts of input_len random token ids:
  ours          -- Engine.encode(input_ids=all prompts) in one call (the scheduler batches them)
  transformers  -- AutoModel forward on batches of --hf-batch equal-length prompts, last-token pooled
Reported: prompt tokens per second (best of --repeat), and the smallest cosine
between the two sides' vectors (a check that both computed the same thing).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from bench_shapes import model_config, save_default_tokenizer  # noqa: E402
from tests.embedding_models import cosine, save_embedding_model  # noqa: E402


def build_checkpoint(name: str, work_dir: Path, tokenizer_dir: Optional[str]) -> Path:
    out = work_dir / f"embed-{name.replace(':', '-')}"
    if (out / "modules.json").is_file():
        return out
    tok_dir = save_default_tokenizer(work_dir / "tokenizer", tokenizer_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model_config(name, smoke=False)
    if getattr(config, "layer_types", None):  # a shape with fewer layers keeps the per-layer list in step
        config.layer_types = config.layer_types[:config.num_hidden_layers]
    return save_embedding_model(config, out, "last", tok_dir, bare_decoder=True)


def best_rate(run: Callable[[], None], tokens: int, repeat: int, device: str) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return tokens / best


def ours(path: Path, prompts: List[List[int]], args) -> tuple:
    from radixserve import Engine

    engine = Engine(str(path), is_embedding=True, device=args.device, dtype=args.dtype,
                    disable_radix_cache=True)  # every repeat computes every token
    vectors = []

    def run() -> None:
        vectors[:] = [r["embedding"] for r in engine.encode(input_ids=prompts)]

    try:
        rate = best_rate(run, sum(map(len, prompts)), args.repeat, "cpu")  # encode() returns host lists
    finally:
        engine.shutdown()
    return rate, vectors


@torch.no_grad()
def transformers_side(path: Path, prompts: List[List[int]], args) -> tuple:
    from transformers import AutoModel

    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    model = AutoModel.from_pretrained(path, dtype=dtype).to(args.device).eval()
    vectors = []

    def run() -> None:
        vectors.clear()
        for i in range(0, len(prompts), args.hf_batch):
            ids = torch.tensor(prompts[i:i + args.hf_batch], device=args.device)
            last = model(ids).last_hidden_state[:, -1].float()
            vectors.extend(torch.nn.functional.normalize(last, dim=-1).cpu())

    rate = best_rate(run, sum(map(len, prompts)), args.repeat, args.device)
    return rate, vectors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen0.6b:4")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--work-dir", default="/tmp/radixserve-embedding-bench")
    p.add_argument("--tokenizer-dir", help="the embedded model's tokenizer files (default: read from its GGUF)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    path = build_checkpoint(args.model, Path(args.work_dir), args.tokenizer_dir)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.input_len)] for _ in range(args.num_requests)]
    ours_rate, ours_vecs = ours(path, prompts, args)
    hf_rate, hf_vecs = transformers_side(path, prompts, args)
    result = {
        "model": args.model, "device": args.device, "dtype": args.dtype, "num_requests": args.num_requests,
        "input_len": args.input_len, "hf_batch": args.hf_batch,
        "ours_tok_s": round(ours_rate, 1), "transformers_tok_s": round(hf_rate, 1),
        "ratio": round(ours_rate / hf_rate, 3),
        "min_cosine": round(min(cosine(a, b) for a, b in zip(ours_vecs, hf_vecs)), 6),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
