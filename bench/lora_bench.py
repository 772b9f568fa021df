"""Serving throughput with requests spread over N LoRA adapters against the base
model alone, on one server, in the same run (alternating, caches flushed).

    .venv/bin/python bench/lora_bench.py [--model-path SmolLM2-135M-Instruct] [--num-adapters 8]
        [--rank 16] [--num-prompts 32] [--input-len 128] [--output-len 64] [--rounds 2]
        [--server-args "--load-format dummy ..."]

The adapters are random rank-R PEFT folders written here (every q/k/v/o and
gate/up/down projection, from the model's config), so no download is needed and a
`--load-format dummy` base works too (the GPU shape). Requests use bench_serving's
random dataset, all sent at once; the LoRA runs give request i adapter i mod N.
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
from pathlib import Path
from typing import Any, List

import torch
from safetensors.torch import save_file

from radixserve import bench_serving
from radixserve.model_loader.source import resolve_model_source
from radixserve.utils.hf_utils import load_config
from tests.server_utils import start_server, stop_server

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def projection_shapes(config: Any) -> dict:
    """PEFT name -> (in, out) of every targeted projection of one layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    h, kv = config.num_attention_heads * head_dim, (config.num_key_value_heads or config.num_attention_heads) * head_dim
    d, f = config.hidden_size, config.intermediate_size
    return {"q_proj": (d, h), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (h, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def write_random_adapter(config: Any, out: Path, rank: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    shapes, tensors = projection_shapes(config), {}
    for layer in range(config.num_hidden_layers):
        for block, names in PROJECTIONS.items():
            for name in names:
                fan_in, fan_out = shapes[name]
                prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors")
    targets = [n for names in PROJECTIONS.values() for n in names]
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets, "bias": "none"}))
    return out


def bench(base_url: str, args: argparse.Namespace, lora_names: List[str]) -> dict:
    argv = ["--base-url", base_url, "--dataset-name", "random", "--num-prompts", str(args.num_prompts),
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--random-range-ratio", "1.0", "--flush-cache", "--seed", "1"]
    if lora_names:
        argv += ["--lora-name", *lora_names]
    if args.output_file:
        argv += ["--output-file", args.output_file]
    return bench_serving.main(argv).record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default="SmolLM2-135M-Instruct")
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--server-args", default="", help="more server flags, one string")
    parser.add_argument("--output-file", default=None, help="bench_serving's JSON lines go here too")
    args = parser.parse_args()

    config = load_config(resolve_model_source(args.model_path))
    names, runs = [f"lora{i}" for i in range(args.num_adapters)], []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [f"{n}={write_random_adapter(config, Path(tmp) / n, args.rank, i)}" for i, n in enumerate(names)]
        proc, url = start_server(args.model_path, "--lora-paths", *paths, "--max-loras-per-batch",
                                 str(args.num_adapters), *shlex.split(args.server_args))
        try:
            for _ in range(args.rounds):
                for mode, lora in (("base", []), ("lora", names)):
                    runs.append((mode, bench(url, args, lora)["output_throughput"]))
        finally:
            stop_server(proc)
    base = [t for m, t in runs if m == "base"]
    lora = [t for m, t in runs if m == "lora"]
    summary = {"base_output_tok_s": base, "lora_output_tok_s": lora,
               "lora_over_base": round(sum(lora) / sum(base), 3), "adapters": args.num_adapters, "rank": args.rank}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
