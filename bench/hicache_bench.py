"""HiCache on vs off, same run: a multi-turn long-context chat workload whose
histories outgrow the device KV pool.

C conversations take T turns; each turn re-sends the whole history plus a new
user message, and all conversations' turns are sent together. With the plain
radix cache the pool forgets most histories between turns; with HiCache they
come back from host memory. Reports throughput (prompt + output tokens over
wall time), time to first token (p50/p99, streamed) and where the cached
tokens came from.

    python bench/hicache_bench.py    # the default model on the CPU (defaults sized for a 2-core box)
    python bench/hicache_bench.py --model-path /models/llama-8b --device-tokens 65536 ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any, Dict, List

import psutil

from radixserve import Engine


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def one_request(engine: Engine, ids: List[int], params: Dict[str, Any]) -> Dict[str, Any]:
    start, first, last = time.perf_counter(), None, None
    async for chunk in await engine.async_generate(input_ids=ids, sampling_params=params, stream=True):
        if first is None and chunk["output_ids"]:
            first = time.perf_counter()
        last = chunk
    return {"ttft": (first or time.perf_counter()) - start, "output_ids": last["output_ids"],
            "meta": last["meta_info"]}


async def workload(engine: Engine, args: argparse.Namespace) -> Dict[str, Any]:
    rng = random.Random(args.seed)
    words = lambda n: [rng.randrange(100, 30000) for _ in range(n)]  # noqa: E731  (ids every vocab here has)
    histories = [words(args.first_len) for _ in range(args.conversations)]
    params = {"temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": True}
    ttfts, tokens, outputs, tiers = [], 0, [], {"device": 0, "host": 0, "storage": 0}
    start = time.perf_counter()
    for _ in range(args.turns):
        results = await asyncio.gather(*(one_request(engine, h, params) for h in histories))
        for history, r in zip(histories, results):
            ttfts.append(r["ttft"])
            tokens += len(history) + len(r["output_ids"])
            outputs.append(r["output_ids"])
            for tier, n in (r["meta"].get("cached_tokens_details") or {}).items():
                tiers[tier] += n
            history += r["output_ids"] + words(args.user_len)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "tokens_per_s": tokens / wall, "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p99_s": percentile(ttfts, 99), "ttft_mean_s": statistics.mean(ttfts),
            "cached_tokens": tiers, "outputs": outputs}


def run(args: argparse.Namespace, hicache: bool) -> Dict[str, Any]:
    extra = dict(enable_hierarchical_cache=True, hicache_ratio=args.hicache_ratio) if hicache else {}
    with Engine(model_path=args.model_path, max_total_tokens=args.device_tokens,
                enable_deterministic_inference=args.deterministic, **extra) as engine:
        children = [psutil.Process(p.pid) for p in engine._procs]
        cpu_before = sum(sum(c.cpu_times()[:2]) for c in children)
        result = asyncio.run(workload(engine, args))
        # CPU seconds of the scheduler and detokenizer: on a shared machine wall time
        # swings with other load, the CPU the server itself spent much less.
        result["server_cpu_s"] = sum(sum(c.cpu_times()[:2]) for c in children) - cpu_before
        result["server"] = {k: engine.get_server_info().get(k) for k in ("num_prefill_tokens", "hicache")}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="None: the packaged default model")
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--first-len", type=int, default=192, help="tokens of each conversation's first message")
    p.add_argument("--user-len", type=int, default=64, help="tokens of each later user message")
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--device-tokens", type=int, default=512, help="device KV pool (--max-total-tokens)")
    p.add_argument("--hicache-ratio", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--deterministic", action="store_true",
                   help="--enable-deterministic-inference: outputs independent of batching and cache hits, "
                        "so on and off must agree token for token")
    args = p.parse_args()
    off, on = run(args, hicache=False), run(args, hicache=True)
    report = {"args": vars(args), "identical_outputs": off.pop("outputs") == on.pop("outputs"),
              "hicache_off": off, "hicache_on": on,
              "server_cpu_ratio_on_over_off": on["server_cpu_s"] / off["server_cpu_s"],
              "speedup_tokens_per_s": on["tokens_per_s"] / off["tokens_per_s"],
              "ttft_p50_ratio_on_over_off": on["ttft_p50_s"] / off["ttft_p50_s"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
