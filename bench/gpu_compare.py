"""Our engine against transformers on one GPU, in one run, with the card's roofline.

    python bench/gpu_compare.py --tokenizer-dir DIR --out results.json
        [--models llama8b,qwen0.6b,qwen30b-a3b:12,deepseek-v2-lite] [--workloads offline,bs1] [--skip-hf]
        [--num-requests 256 --input-len 512 --output-len 256] [--engine-arg key=value ...]
        [--tp-size N [--ep-size M]]
    python bench/gpu_compare.py --smoke --out smoke.json   # tiny shapes, runs on a CPU

1. The card: device-to-device copy bandwidth and bf16 GEMM rate (best of several).
2. Per model shape (random "dummy" weights of the real shapes, bench_shapes.py) and workload:
   offline  -- num_requests x input_len random ids x output_len new tokens (ignore_eos,
               greedy), all submitted at once: output tok/s over the whole run.
               Ours: Engine.generate; transformers: model.generate_batch (continuous batching),
               or for DeepSeek, where generate_batch fails, model.generate on static batches.
   bs1      -- one 128-token prompt, 256 new tokens: ms per decode step, from
               (t(256 tokens) - t(1 token)) / 255, best of 2.
               Ours: Engine.generate; transformers: model.generate.
3. The roofline (formulas in roofline_*), our fraction of it, and the ratio to transformers.

With --tp-size N > 1 our engine runs on N GPUs (one rank each) and the
transformers peer is skipped: it runs on one GPU, so a ratio to it would not
compare like with like. Compare against this script's own --tp-size 1 run of
the same session instead. The roofline then assumes N cards (N times the
bandwidth and the matmul rate, all-reduces free), an upper bound.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from radixserve import Engine  # noqa: E402
from bench_shapes import MODELS, Shape, model_config, save_default_tokenizer  # noqa: E402


# ---------------------------------------------------------------- shapes

def model_dir(name: str, config, tokenizer_dir: Path, root: Path) -> Path:
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    config.eos_token_id = None  # every run generates exactly output_len tokens
    config.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out


# ---------------------------------------------------------------- the card

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], None], device: str, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_card(device: str, smoke: bool) -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate."""
    nbytes = (64 << 20) if smoke else (4 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_copy = best_time(lambda: dst.copy_(src), device, 3 if smoke else 10)
    del src, dst
    n = 512 if smoke else 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    reps = 1 if smoke else 20
    t_mm = best_time(lambda: [a @ b for _ in range(reps)], device, 3 if smoke else 5) / reps
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"copy_GBps": round(2 * nbytes / t_copy / 1e9, 1), "bf16_TFLOPs": round(2 * n ** 3 / t_mm / 1e12, 4)}


# ---------------------------------------------------------------- roofline

def roofline_bs1_ms(shape: Shape, card: dict, context: int) -> float:
    """One decode step reads every weight it multiplies by once (bf16; the input
    embedding only for the one row it looks up; MoE: only the top-k experts) plus
    the request's KV."""
    nbytes = shape.weight_bytes(1) + shape.kv_bytes_per_token() * context
    return nbytes / (card["copy_GBps"] * 1e9) * 1e3


def roofline_offline_tok_s(shape: Shape, card: dict, n: int, inp: int, out: int) -> float:
    """T = prefill FLOPs / matmul rate + sum over decode steps of
    max(step FLOPs / matmul rate, (weights read + every request's KV) / bandwidth), with
    all n requests decoding together. FLOPs = 2 x active params per token plus
    attention (2 x heads x (q.k width + value width) per key per layer; MLA decodes
    in its absorbed form). An MoE step reads the experts its n tokens hit."""
    flops_rate, bw = card["bf16_TFLOPs"] * 1e12, card["copy_GBps"] * 1e9
    active = shape.active_params()
    prefill = n * (2 * active * inp + shape.attn_flops_per_key(decode=False) * inp * (inp + 1) / 2)
    seconds = prefill / flops_rate
    step_weights = shape.weight_bytes(n)
    for step in range(out):
        context = inp + step
        flops = n * (2 * active + shape.attn_flops_per_key(decode=True) * context)
        nbytes = step_weights + n * context * shape.kv_bytes_per_token()
        seconds += max(flops / flops_rate, nbytes / bw)
    return n * out / seconds


# ---------------------------------------------------------------- workloads

def random_prompts(n: int, length: int, vocab: int, seed: int) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (length,), generator=g).tolist() for _ in range(n)]


@dataclass
class Row:
    model: str
    workload: str
    metric: str  # "output tok/s" (higher is better) or "ms/token" (lower is better)
    radixserve: Optional[float]
    transformers: Optional[float]
    roofline: float
    note: str = ""

    def ratio(self) -> Optional[float]:
        if not self.radixserve or not self.transformers:
            return None
        if self.metric == "ms/token":
            return round(self.transformers / self.radixserve, 2)
        return round(self.radixserve / self.transformers, 2)

    def fraction_of_roofline(self) -> Optional[float]:
        if not self.radixserve:
            return None
        if self.metric == "ms/token":
            return round(self.roofline / self.radixserve, 3)
        return round(self.radixserve / self.roofline, 3)


def ours(path: Path, args, engine_args: dict, vocab: int) -> Dict[str, float]:
    results = {}
    start = time.perf_counter()
    with Engine(model_path=str(path), load_format="dummy", dtype="bfloat16" if args.device == "cuda" else "float32",
                mem_fraction_static=args.mem_fraction_static if args.device == "cuda" else None,
                **{"log_level": "warning", "tp_size": args.tp_size, "ep_size": args.ep_size, **engine_args}) as engine:
        results["startup_s"] = round(time.perf_counter() - start, 1)
        greedy = {"temperature": 0, "ignore_eos": True}
        engine.generate(input_ids=random_prompts(4, 64, vocab, 99), sampling_params={**greedy, "max_new_tokens": 8})
        if "offline" in args.workloads:
            # Run 1 is the first after start-up; later runs (fresh prompts: no
            # cache hits) show whether run 1 paid for anything a warm server does not.
            for run_index in range(args.offline_runs):
                prompts = random_prompts(args.num_requests, args.input_len, vocab, 1 + 1000 * run_index)
                start = time.perf_counter()
                outs = engine.generate(input_ids=prompts, sampling_params={**greedy, "max_new_tokens": args.output_len})
                seconds = time.perf_counter() - start
                tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
                results.setdefault("offline_tok_s_runs", []).append(round(tokens / seconds, 1))
                if run_index == 0:
                    results["offline_output_tokens"] = tokens
                    results["offline_seconds"] = round(seconds, 3)
                    results["offline_tok_s"] = round(tokens / seconds, 1)
        if "bs1" in args.workloads:
            def run(n: int, seed: int) -> float:
                prompt = random_prompts(1, 128, vocab, seed)[0]  # a fresh prompt: no cache hit
                start = time.perf_counter()
                out = engine.generate(input_ids=prompt, sampling_params={**greedy, "max_new_tokens": n})
                assert out["meta_info"]["completion_tokens"] == n
                return time.perf_counter() - start
            results["bs1_ms"] = round(min((run(args.bs1_tokens, 10 + i) - run(1, 20 + i)) / (args.bs1_tokens - 1)
                                          for i in range(2)) * 1e3, 3)
        results["kernel_compiles_while_serving"] = engine.get_server_info()["kernel_compiles_while_serving"]
    return results


def uses_static_batches(config) -> bool:
    """transformers 5.17's generate_batch (continuous batching, paged cache) fails
    on DeepSeek's MLA, so there it runs generate on static batches instead."""
    return config.model_type.startswith("deepseek")


def hf_generate_batch(model, prompts: List[List[int]], args, vocab: int) -> Dict[str, object]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(max_new_tokens=args.output_len, do_sample=False)
    # On a GPU transformers sizes its paged cache from free memory; on a CPU
    # (smoke runs) that would take all of it, so give it a small cache, and a
    # small token budget per step: its per-step buffers are sized by that
    # budget, and filling the default ones took ~28 s per smoke run.
    cb = (ContinuousBatchingConfig(num_blocks=64, block_size=32, max_batch_tokens=256)
          if args.device == "cpu" else None)
    model.generate_batch(random_prompts(4, 64, vocab, 99), generation_config=GenerationConfig(
        max_new_tokens=8, do_sample=False), continuous_batching_config=cb, progress_bar=False)
    sync(args.device)
    start = time.perf_counter()
    outs = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb, progress_bar=False)
    sync(args.device)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    return {"offline_mode": "generate_batch", "offline_output_tokens": tokens,
            "offline_seconds": round(seconds, 3), "offline_tok_s": round(tokens / seconds, 1)}


def hf_static_batches(model, prompts: List[List[int]], args) -> Dict[str, object]:
    """generate() on batches of --hf-static-batch-size equal-length prompts (no padding)."""
    size = args.hf_static_batch_size

    def run(batch: List[List[int]], new_tokens: int) -> int:
        x = torch.tensor(batch, device=args.device)
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return (y.shape[1] - x.shape[1]) * y.shape[0]

    run(prompts[:2], 4)  # warm-up
    sync(args.device)
    start = time.perf_counter()
    tokens = sum(run(prompts[i:i + size], args.output_len) for i in range(0, len(prompts), size))
    sync(args.device)
    seconds = time.perf_counter() - start
    return {"offline_mode": f"generate, static batches of {size}", "offline_output_tokens": tokens,
            "offline_seconds": round(seconds, 3), "offline_tok_s": round(tokens / seconds, 1)}


def theirs(config, args, vocab: int) -> Dict[str, object]:
    from transformers import AutoModelForCausalLM

    results: Dict[str, object] = {}
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    try:
        if "offline" in args.workloads:
            n = args.hf_offline_requests or args.num_requests
            prompts = random_prompts(n, args.input_len, vocab, 1)
            try:
                if uses_static_batches(config):
                    results.update(hf_static_batches(model, prompts, args))
                else:
                    results.update(hf_generate_batch(model, prompts, args, vocab))
                results["offline_requests"] = n
            except Exception as e:  # a peer that cannot run the workload is reported, not fatal
                results["offline_error"] = f"{type(e).__name__}: {e}"
        if "bs1" in args.workloads:
            def run(n: int, seed: int) -> float:
                x = torch.tensor([random_prompts(1, 128, vocab, seed)[0]], device=args.device)
                sync(args.device)
                start = time.perf_counter()
                with torch.no_grad():
                    y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=0)
                sync(args.device)
                assert y.shape[1] - x.shape[1] == n
                return time.perf_counter() - start
            run(2, 0)
            results["bs1_ms"] = round(min((run(args.bs1_tokens, 10 + i) - run(1, 20 + i)) / (args.bs1_tokens - 1)
                                          for i in range(2)) * 1e3, 3)
    finally:
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------- main

def parse_engine_args(pairs: List[str]) -> dict:
    def coerce(value: str):
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value
    return {k: coerce(v) for k, v in (p.split("=", 1) for p in pairs)}


def table(rows: List[Row]) -> str:
    lines = ["| model | workload | metric | radixserve | transformers | ours vs transformers | roofline | "
             "our fraction of roofline |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.model} | {r.workload} | {r.metric} | {r.radixserve} | {r.transformers} | "
                     f"{f'{r.ratio()}x' if r.ratio() else '-'} | {r.roofline:.3g} | {r.fraction_of_roofline()} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where to write the JSON results")
    p.add_argument("--tokenizer-dir", help="tokenizer files to put next to each config (default: the embedded model's)")
    p.add_argument("--models", default="llama8b,qwen0.6b",
                   help=f"comma-separated, of {', '.join(MODELS)}; NAME:L runs the shape with L layers")
    p.add_argument("--workloads", default="offline,bs1")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--bs1-tokens", type=int, default=256)
    p.add_argument("--hf-offline-requests", type=int, help="run transformers' offline workload on fewer requests")
    p.add_argument("--hf-static-batch-size", type=int, default=64,
                   help="batch size of transformers' generate where generate_batch cannot run (DeepSeek)")
    p.add_argument("--mem-fraction-static", type=float, default=0.85)
    p.add_argument("--engine-arg", action="append", default=[], help="key=value passed to our Engine")
    p.add_argument("--offline-runs", type=int, default=1,
                   help="run the offline workload this many times (fresh prompts each): the first vs the later ones")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks of our engine (one GPU each); "
                                                          "above 1 the transformers peer is skipped")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel ranks among them (MoE shapes)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and counts; runs on a CPU")
    p.add_argument("--work-dir", default="/tmp/gpu_compare")
    args = p.parse_args()
    args.workloads = args.workloads.split(",")
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.num_requests, args.input_len, args.output_len, args.bs1_tokens = 4, 16, 8, 8
    root = Path(args.work_dir)
    tokenizer_dir = save_default_tokenizer(root / "tokenizer", args.tokenizer_dir)
    engine_args = parse_engine_args(args.engine_arg)
    if args.tp_size > 1 and not args.skip_hf:
        print(f"--tp-size {args.tp_size}: skipping transformers (one GPU; compare with a --tp-size 1 run)",
              flush=True)
        args.skip_hf = True

    card = measure_card(args.device, args.smoke)
    # The roofline of tp cards together: each reads 1/tp of the weights and does 1/tp of the FLOPs.
    cards = {k: v * args.tp_size for k, v in card.items()}
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": torch.cuda.get_device_name(0)
              if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "card": card, "engine_args": engine_args,
              "tp_size": args.tp_size, "ep_size": args.ep_size,
              "workload": {"num_requests": args.num_requests, "input_len": args.input_len,
                           "output_len": args.output_len, "bs1_prompt": 128, "bs1_tokens": args.bs1_tokens},
              "models": {}}
    print(json.dumps(report), flush=True)
    rows: List[Row] = []
    for name in args.models.split(","):
        config = model_config(name, args.smoke)
        shape = Shape.of(config)
        vocab = min(shape.vocab, 49152)  # ids the tokenizer can decode
        path = model_dir(name, config, tokenizer_dir, root)
        ours_res = ours(path, args, engine_args, vocab)
        print(json.dumps({name: {"radixserve": ours_res}}), flush=True)
        hf_res = {} if args.skip_hf else theirs(config, args, vocab)
        report["models"][name] = {"shape": asdict(shape), "radixserve": ours_res, "transformers": hf_res}
        if "offline" in args.workloads:
            roof = roofline_offline_tok_s(shape, cards, args.num_requests, args.input_len, args.output_len)
            hf_n = hf_res.get("offline_requests", args.num_requests)
            notes = [f"transformers on {hf_n} requests"] if hf_n != args.num_requests and not args.skip_hf else []
            if args.tp_size > 1:
                notes.append(f"tp={args.tp_size}, ep={args.ep_size}; roofline of {args.tp_size} cards")
            if hf_res.get("offline_mode", "generate_batch") != "generate_batch":
                notes.append(f"transformers: {hf_res['offline_mode']}")
            note = "; ".join(notes)
            rows.append(Row(name, f"offline {args.num_requests}x{args.input_len}/{args.output_len}", "output tok/s",
                            ours_res.get("offline_tok_s"), hf_res.get("offline_tok_s"), roof, note))
        if "bs1" in args.workloads:
            roof = roofline_bs1_ms(shape, cards, 128 + args.bs1_tokens // 2)
            note = f"tp={args.tp_size}, ep={args.ep_size}; roofline of {args.tp_size} cards" if args.tp_size > 1 else ""
            rows.append(Row(name, "batch-1 decode", "ms/token", ours_res.get("bs1_ms"), hf_res.get("bs1_ms"), roof,
                            note))
        print(json.dumps({name: report["models"][name]}), flush=True)
        report["rows"] = [{**asdict(r), "ratio": r.ratio(), "fraction_of_roofline": r.fraction_of_roofline()}
                          for r in rows]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))  # after each model: a cut-off run keeps its part
    print(f"card: {card}")
    print(table(rows), flush=True)


if __name__ == "__main__":
    main()
