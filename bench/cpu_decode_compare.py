"""Decode throughput of the engine against transformers' generate, same model, same run.

    .venv/bin/python bench/cpu_decode_compare.py [--model-path SmolLM2-135M-Instruct] [--batches 1,8,32]
        [--engine-arg key=value ...] [--hf-dtypes float32,bfloat16] [--http] [--out results.jsonl]

For each batch size (128 prompt tokens, 64 new tokens each, greedy, EOS
ignored) it times a 1-token and a 64-token generation; decode tok/s =
63 * batch / (t64 - t1), so prefill is not counted. The engine and each
transformers model take turns in this process; none is busy while another runs.

--http then closes them and starts the HTTP server with the same engine
arguments, and drives it with our bench_serving: 96 prompts of 128 random
tokens, 64 new tokens, 32 concurrent streaming clients (which share the CPU
with the server). Its output tok/s compares with the engine's output tok/s
at batch 32 (prefill included in both). Both are measured alike: the
offline figure is the faster of two timed runs after warm-up runs, the HTTP
one the faster of two rounds after a warm-up round of the same 96 requests
(on three fresh servers the first round gave 765-797 tok/s and the next
ones 815-872, its API process using about twice the CPU a token). Both
measured rounds are kept in the results.

It ends with issue 20's ratios as a markdown table, for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gpu_compare import parse_engine_args
from radixserve import Engine

PROMPT_LEN, NEW_TOKENS = 128, 64
HTTP_ROUNDS = 2  # measured, after one warm-up round


def prompts(batch: int, vocab: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(batch)]


def time_engine(engine: Engine, ids: list, new_tokens: int) -> float:
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    start = time.perf_counter()
    outs = engine.generate(input_ids=ids, sampling_params=params)
    elapsed = time.perf_counter() - start
    assert all(len(o["output_ids"]) == new_tokens for o in outs)
    return elapsed


def time_hf(model, ids: list, new_tokens: int) -> float:
    x = torch.tensor(ids)
    start = time.perf_counter()
    with torch.no_grad():
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert y.shape[1] == PROMPT_LEN + new_tokens
    return elapsed


def decode_rate(timer, target, ids: list) -> dict:
    timer(target, ids[:1], 2)  # warm-up
    t1 = min(timer(target, ids, 1) for _ in range(2))
    t64 = min(timer(target, ids, NEW_TOKENS) for _ in range(2))
    return {"decode_tok_s": round((NEW_TOKENS - 1) * len(ids) / (t64 - t1), 1),
            "output_tok_s": round(NEW_TOKENS * len(ids) / t64, 1), "t1_s": round(t1, 3), "t64_s": round(t64, 3)}


def http_rate(model_path: str, engine_args: dict) -> dict:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from radixserve.bench_serving import parse_args, run_benchmark
    from tests.server_utils import free_port, launch_on_port, stop_server

    flags = [f"--{key.replace('_', '-')}" + ("" if value is True else f"={value}")
             for key, value in engine_args.items() if value is not False]
    port = free_port()
    server = launch_on_port(model_path, port, "--disable-radix-cache", *flags, timeout_s=300)
    argv = ["--backend", "sglang", "--base-url", f"http://127.0.0.1:{port}", "--dataset-name", "random",
            "--num-prompts", "96", "--random-input-len", str(PROMPT_LEN), "--random-output-len",
            str(NEW_TOKENS), "--random-range-ratio", "1.0", "--max-concurrency", "32"]
    try:
        # Measured as the offline figure is: the best of two runs after a warm-up of the same shape.
        rounds = [run_benchmark(parse_args(argv)).record for _ in range(1 + HTTP_ROUNDS)][1:]
    finally:
        stop_server(server)
    best = max(rounds, key=lambda record: record["output_throughput"])
    keys = ("output_throughput", "median_ttft_ms", "median_itl_ms", "p99_itl_ms", "duration_s", "completed")
    result = {key: best.get(key) for key in keys}
    result["output_throughput_rounds"] = [round(record["output_throughput"], 1) for record in rounds]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default="SmolLM2-135M-Instruct")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--engine-arg", action="append", default=[], help="key=value for our Engine, e.g. "
                                                                          "torchao_config=int8wo")
    parser.add_argument("--hf-dtypes", default="float32", help="transformers' dtypes, each run in turn")
    parser.add_argument("--http", action="store_true", help="then the HTTP server at 32 streaming clients")
    parser.add_argument("--out", help="append the results as one JSON line")
    args = parser.parse_args()
    engine_args = parse_engine_args(args.engine_arg)
    from transformers import AutoModelForCausalLM

    from radixserve.model_loader.source import resolve_model_source

    source = resolve_model_source(args.model_path)
    kwargs = {"gguf_file": source.path.name} if source.kind == "gguf" else {}
    hfs = {dt: AutoModelForCausalLM.from_pretrained(source.folder, dtype=getattr(torch, dt), **kwargs).eval()
           for dt in args.hf_dtypes.split(",")}
    vocab = next(iter(hfs.values())).config.vocab_size
    results = {"threads": torch.get_num_threads(), "engine_args": engine_args}
    # The radix cache would serve the repeated prompts from cache; transformers recomputes them.
    with Engine(model_path=args.model_path, log_level="warning", disable_radix_cache=True, **engine_args) as engine:
        for bs in map(int, args.batches.split(",")):
            ids = prompts(bs, vocab)
            results[f"radixserve_bs{bs}"] = decode_rate(time_engine, engine, ids)
            for dt, hf in hfs.items():
                results[f"transformers_{dt}_bs{bs}"] = decode_rate(time_hf, hf, ids)
            print(json.dumps({k: v for k, v in results.items() if k.endswith(f"_bs{bs}")}), flush=True)
    del hfs
    if args.http:
        results["radixserve_http_c32"] = http_rate(args.model_path, engine_args)
    results["cpu"] = cpu_name()
    print(json.dumps(results, indent=1))
    print(targets_table(results))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(results) + "\n")


def targets_table(results: dict) -> str:
    """Issue 20's ratios as a markdown table: each batch's decode tok/s against
    transformers (float32 at batch 1, the better dtype above), HTTP against offline."""
    lines = ["| | radixserve | transformers | ratio |", "| --- | --- | --- | --- |"]
    prefix = "radixserve_bs"
    for bs in sorted(int(k[len(prefix):]) for k in results if k.startswith(prefix)):
        peers = {k.split("_")[1]: v["decode_tok_s"] for k, v in results.items()
                 if k.startswith("transformers_") and k.endswith(f"_bs{bs}")}
        if bs == 1 and "float32" in peers:
            peers = {"float32": peers["float32"]}
        if not peers:
            continue
        dtype, peer = max(peers.items(), key=lambda item: item[1])
        ours = results[f"{prefix}{bs}"]["decode_tok_s"]
        lines.append(f"| batch {bs}, decode tok/s | {ours:,.1f} | {peer:,.1f} ({dtype}) | {ours / peer:.2f}x |")
    http, offline = results.get("radixserve_http_c32"), results.get("radixserve_bs32")
    if http and offline:
        lines.append(f"| HTTP, 32 streaming clients, output tok/s | {http['output_throughput']:,.1f} | "
                     f"offline batch 32: {offline['output_tok_s']:,.1f} | {http['output_throughput'] / offline['output_tok_s']:.3f} |")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU model and its matrix/vector extensions that matter here (AMX, AVX-512 BF16)."""
    info = open("/proc/cpuinfo").read()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extras = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    return f"{name} ({', '.join(extras) or 'no AVX-512'})"


if __name__ == "__main__":
    main()
