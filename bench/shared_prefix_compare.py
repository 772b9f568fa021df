"""Shared-prefix workload with the radix cache on and off, same model, same run.

    .venv/bin/python bench/shared_prefix_compare.py [--groups 16 --per-group 8 --system-len 512]

Each group has its own random system prompt of --system-len tokens; each question
adds 16-32 tokens. All requests are sent at once, greedy, 8 new tokens each. Reports
prefill tokens actually computed and wall time, and checks both runs give the same text.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from radixserve import Engine


def workload(groups: int, per_group: int, system_len: int, vocab: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    prompts = []
    for _ in range(groups):
        system = [rng.randrange(100, vocab) for _ in range(system_len)]
        for _ in range(per_group):
            prompts.append(system + [rng.randrange(100, vocab) for _ in range(rng.randint(16, 32))])
    rng.shuffle(prompts)
    return prompts


def run(model_path: str, prompts: list, **server_args) -> dict:
    with Engine(model_path=model_path, log_level="warning", **server_args) as engine:
        start = time.perf_counter()
        outs = engine.generate(input_ids=prompts, sampling_params={
            "temperature": 0, "max_new_tokens": 8, "ignore_eos": True})
        wall = time.perf_counter() - start
        info = engine.get_server_info()
    return {
        "wall_s": round(wall, 2),
        "prefill_tokens_computed": info["num_prefill_tokens"],
        "prompt_tokens": sum(len(p) for p in prompts),
        "cached_tokens": sum(o["meta_info"]["cached_tokens"] for o in outs),
        "outputs": [o["output_ids"] for o in outs],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default="SmolLM2-135M-Instruct")
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--per-group", type=int, default=8)
    parser.add_argument("--system-len", type=int, default=512)
    args = parser.parse_args()
    prompts = workload(args.groups, args.per_group, args.system_len, vocab=49152)
    on = run(args.model_path, prompts)
    off = run(args.model_path, prompts, disable_radix_cache=True)
    same = sum(a == b for a, b in zip(on.pop("outputs"), off.pop("outputs")))
    print(json.dumps({"radix_on": on, "radix_off": off, "identical_outputs": f"{same}/{len(prompts)}"}, indent=1))


if __name__ == "__main__":
    main()
