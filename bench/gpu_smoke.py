"""GPU smoke test and first numbers for the CUDA path (torch-native attention, no graphs yet).

    python bench/gpu_smoke.py --tokenizer-dir DIR --out OUT_DIR

1. Correctness on CUDA: a tiny random Llama in float32, greedy 16 tokens for 4 prompts,
   our Engine against transformers on the same GPU.
2. Speed: Llama-3-8B shapes with random (dummy) bf16 weights, decode tok/s at batch 1 and
   16 (128 prompt + 64 new tokens), our Engine against transformers `generate`, same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from radixserve import Engine


def make_model_dir(out: Path, tokenizer_dir: Path, config: LlamaConfig, weights: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    if weights:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    else:
        config.save_pretrained(out)
    return out


def correctness(root: Path, tokenizer_dir: Path) -> dict:
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024,
                         initializer_range=0.1, tie_word_embeddings=False)
    path = make_model_dir(root / "tiny", tokenizer_dir, config, weights=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 49152, (n,), generator=g).tolist() for n in (5, 17, 33, 64)]
    expected = []
    for ids in prompts:
        x = torch.tensor([ids], device="cuda")
        y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, min_new_tokens=16,
                        do_sample=False, pad_token_id=0)
        expected.append(y[0, len(ids):].tolist())
    del hf
    with Engine(model_path=str(path), dtype="float32", log_level="warning") as engine:
        outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 16,
                                                                   "ignore_eos": True})
        info = engine.get_server_info()
    got = [o["output_ids"] for o in outs]
    return {"identical": sum(a == b for a, b in zip(got, expected)), "of": len(prompts), "device": info["device"]}


def decode_rate(generate, batch: int, vocab: int) -> float:
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(100, vocab, (128,), generator=g).tolist() for _ in range(batch)]
    generate(ids[:1], 2)
    times = {}
    for n in (1, 64):
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(ids, n)
        torch.cuda.synchronize()
        times[n] = time.perf_counter() - start
    return round(63 * batch / (times[64] - times[1]), 1)


def speed(root: Path, tokenizer_dir: Path) -> dict:
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    path = make_model_dir(root / "llama8b", tokenizer_dir, config, weights=False)
    results = {}
    with Engine(model_path=str(path), load_format="dummy", dtype="bfloat16", log_level="warning",
                mem_fraction_static=0.6, disable_radix_cache=True) as engine:
        def ours(ids, n):
            engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": n, "ignore_eos": True})
        for bs in (1, 16):
            results[f"radixserve_bs{bs}"] = decode_rate(ours, bs, config.vocab_size)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()

    def theirs(ids, n):
        x = torch.tensor(ids, device="cuda")
        with torch.no_grad():
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)
    for bs in (1, 16):
        results[f"transformers_bs{bs}"] = decode_rate(theirs, bs, config.vocab_size)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--out", default="/tmp/gpu_smoke")
    args = parser.parse_args()
    root = Path("/tmp/gpu_smoke_models")
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    report["correctness"] = correctness(root, Path(args.tokenizer_dir))
    print(json.dumps(report), flush=True)
    report["speed_decode_tok_s"] = speed(root, Path(args.tokenizer_dir))
    print(json.dumps(report, indent=1), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_smoke.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
