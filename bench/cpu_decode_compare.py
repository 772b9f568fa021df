"""Decode throughput of the engine against transformers' generate, same model, same run.

    .venv/bin/python bench/cpu_decode_compare.py [--model-path SmolLM2-135M-Instruct]

For batch 1 and for 32 concurrent requests (128 prompt tokens, 64 new tokens each,
greedy, EOS ignored) it times a 1-token and a 64-token generation; decode tok/s =
63 * batch / (t64 - t1), so prefill is not counted.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from radixserve import Engine

PROMPT_LEN, NEW_TOKENS = 128, 64


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default="SmolLM2-135M-Instruct")
    parser.add_argument("--batches", default="1,32")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from radixserve.model_loader.source import resolve_model_source

    source = resolve_model_source(args.model_path)
    kwargs = {"gguf_file": source.path.name} if source.kind == "gguf" else {}
    hf = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32, **kwargs).eval()
    results = {"threads": torch.get_num_threads()}
    # The radix cache would serve the repeated prompts from cache; transformers recomputes them.
    with Engine(model_path=args.model_path, log_level="warning", disable_radix_cache=True) as engine:
        for bs in map(int, args.batches.split(",")):
            ids = prompts(bs, hf.config.vocab_size)
            results[f"radixserve_bs{bs}"] = decode_rate(time_engine, engine, ids)
            results[f"transformers_bs{bs}"] = decode_rate(time_hf, hf, ids)
            print(json.dumps({k: v for k, v in results.items() if str(bs) in k}), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
