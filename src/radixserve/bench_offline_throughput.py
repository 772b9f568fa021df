"""Throughput of the Engine with no HTTP: `python -m radixserve.bench_offline_throughput
--model-path P [ServerArgs flags] --dataset-name random --num-prompts 200`.

All requests go to the engine at once, so the scheduler batches as much as
memory allows; the numbers are requests/s and input/output/total tokens/s.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from radixserve.benchmark.datasets import BenchRequest, DatasetConfig, add_dataset_args, sample_requests
from radixserve.benchmark.metrics import throughput_metrics
from radixserve.benchmark.report import append_json_line, now_iso, print_table
from radixserve.server_args import ServerArgs

WARMUP_PROMPT = "The benchmark warms up with this prompt."
WARMUP_OUTPUT_LEN = 4

OFFLINE_ROWS = [
    ("Model", "model_path"),
    ("Dataset", "dataset_name"),
    ("Successful requests", "completed"),
    ("Benchmark duration (s)", "duration_s"),
    ("Total input tokens", "total_input_tokens"),
    ("Total generated tokens", "total_output_tokens"),
    ("Request throughput (req/s)", "request_throughput"),
    ("Input token throughput (tok/s)", "input_throughput"),
    ("Output token throughput (tok/s)", "output_throughput"),
    ("Total token throughput (tok/s)", "total_throughput"),
]


@dataclass
class OfflineResult:
    requests: List[BenchRequest]
    results: List[Dict[str, Any]]  # the engine's result dicts, in request order
    record: Dict[str, Any]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m radixserve.bench_offline_throughput", allow_abbrev=False)
    ServerArgs.add_cli_args(parser)
    add_dataset_args(parser)
    parser.add_argument("--disable-ignore-eos", action="store_true",
                        help="let requests stop at EOS (by default they generate their full output length)")
    parser.add_argument("--output-file", default=None, help="append one JSON line with the results")
    return parser.parse_args(argv)


def generate_all(engine: Any, requests: List[BenchRequest], ignore_eos: bool) -> List[Dict[str, Any]]:
    """One generate call for every request: the engine sees them all at once."""
    params = [{"max_new_tokens": r.output_len, "temperature": 0.0, "ignore_eos": ignore_eos} for r in requests]
    if requests[0].use_ids:
        return engine.generate(input_ids=[r.prompt_ids for r in requests], sampling_params=params)
    return engine.generate(prompt=[r.prompt for r in requests], sampling_params=params)


def run_benchmark(args: argparse.Namespace) -> OfflineResult:
    from radixserve.entrypoints.engine import Engine

    server_args = ServerArgs.from_cli_args(args)
    dataset = DatasetConfig.from_args(args)
    ignore_eos = not args.disable_ignore_eos
    with Engine(**vars(server_args)) as engine:
        requests = sample_requests(dataset, engine.get_tokenizer())
        # The first forward pays one-time costs (allocations, kernel selection).
        engine.generate(WARMUP_PROMPT, {"max_new_tokens": WARMUP_OUTPUT_LEN, "temperature": 0.0})
        start = time.perf_counter()
        results = generate_all(engine, requests, ignore_eos)
        duration = time.perf_counter() - start
    metas = [r["meta_info"] for r in results]
    metrics = throughput_metrics(len(results), sum(m["prompt_tokens"] for m in metas),
                                 sum(m["completion_tokens"] for m in metas), duration)
    record = {
        "tool": "bench_offline_throughput", "date": now_iso(), "model_path": server_args.model_path,
        "load_format": server_args.load_format, "dtype": server_args.dtype, **vars(dataset),
        "num_prompts": len(requests), "ignore_eos": ignore_eos, **metrics,
    }
    return OfflineResult(requests, results, record)


def main(argv: Optional[Sequence[str]] = None) -> OfflineResult:
    args = parse_args(argv)
    result = run_benchmark(args)
    rows = [(label, result.record[key]) for label, key in OFFLINE_ROWS]
    print_table("Offline Throughput Benchmark Result", rows)
    append_json_line(args.output_file, result.record)
    return result


if __name__ == "__main__":
    main()
