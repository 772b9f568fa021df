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
    with Engine(model_path=args.model_path, max_total_tokens=args.device_tokens, load_format=args.load_format,
                enable_deterministic_inference=args.deterministic, **extra) as engine:
        children = [psutil.Process(p.pid) for p in engine._procs]
        cpu_before = sum(sum(c.cpu_times()[:2]) for c in children)
        result = asyncio.run(workload(engine, args))
        # CPU seconds of the scheduler and detokenizer: on a shared machine wall time
        # swings with other load, the CPU the server itself spent much less.
        result["server_cpu_s"] = sum(sum(c.cpu_times()[:2]) for c in children) - cpu_before
        result["server"] = {k: engine.get_server_info().get(k) for k in ("num_prefill_tokens", "hicache")}
    return result


def run_in_process(args: argparse.Namespace, hicache: bool) -> Dict[str, Any]:
    """The same turns through a Scheduler and ModelRunner in this process, one turn's
    conversations queued together: no HTTP, no subprocesses, so the process's CPU
    seconds measure the serving work itself (wall time on a shared machine does not)."""
    from radixserve.managers import io_struct as io
    from radixserve.managers.scheduler import Scheduler
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.sampling.sampling_params import SamplingParams
    from radixserve.server_args import ServerArgs

    extra = dict(enable_hierarchical_cache=True, hicache_ratio=args.hicache_ratio) if hicache else {}
    server_args = ServerArgs(model_path=args.model_path, max_total_tokens=args.device_tokens,
                             load_format=args.load_format, grammar_backend="none",
                             enable_deterministic_inference=args.deterministic, **extra)
    sent: List[Any] = []
    scheduler = Scheduler(server_args, ModelRunner(server_args), tokenizer=None, eos_token_ids=set(),
                          send=sent.append)
    rng = random.Random(args.seed)
    histories = [[rng.randrange(100, 30000) for _ in range(args.first_len)] for _ in range(args.conversations)]
    cpu, wall, outputs = time.process_time(), time.perf_counter(), []
    for turn in range(args.turns):
        for i, history in enumerate(histories):
            params = SamplingParams(max_new_tokens=args.output_len, temperature=0.0, ignore_eos=True)
            params.normalize()
            scheduler.dispatch(io.TokenizedGenerateReqInput(f"{turn}-{i}", list(history), params))
        got: Dict[str, List[int]] = {}
        while not scheduler.is_idle():
            scheduler.step()
            for out in (o for m in sent if isinstance(m, io.BatchTokenIDOut) for o in m.outputs):
                got.setdefault(out.rid, []).extend(out.new_token_ids)
            sent.clear()
        for i, history in enumerate(histories):
            outputs.append(got[f"{turn}-{i}"])
            history += got[f"{turn}-{i}"] + [rng.randrange(100, 30000) for _ in range(args.user_len)]
    return {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall, "outputs": outputs,
            "num_prefill_tokens": scheduler.admission.num_prefill_tokens}


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
    p.add_argument("--load-format", default="auto", help="dummy: random weights of the model's shapes (the GPU runs)")
    p.add_argument("--deterministic", action="store_true",
                   help="--enable-deterministic-inference: outputs independent of batching and cache hits, "
                        "so on and off must agree token for token")
    p.add_argument("--in-process", action="store_true", help="measure CPU seconds of the scheduler loop "
                                                              "run in this process instead (see run_in_process)")
    args = p.parse_args()
    if args.in_process:
        off, on = run_in_process(args, hicache=False), run_in_process(args, hicache=True)
        print(json.dumps({"args": vars(args), "identical_outputs": off.pop("outputs") == on.pop("outputs"),
                          "hicache_off": off, "hicache_on": on,
                          "cpu_ratio_on_over_off": on["cpu_s"] / off["cpu_s"]}, indent=2))
        return
    off, on = run(args, hicache=False), run(args, hicache=True)
    report = {"args": vars(args), "identical_outputs": off.pop("outputs") == on.pop("outputs"),
              "hicache_off": off, "hicache_on": on,
              "server_cpu_ratio_on_over_off": on["server_cpu_s"] / off["server_cpu_s"],
              "speedup_tokens_per_s": on["tokens_per_s"] / off["tokens_per_s"],
              "ttft_p50_ratio_on_over_off": on["ttft_p50_s"] / off["ttft_p50_s"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
