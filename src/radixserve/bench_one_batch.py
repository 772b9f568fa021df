"""Latency of one static batch through the model runner, without the scheduler:
`python -m radixserve.bench_one_batch --model-path P --batch-size 1 8 32 --input-len 256
--output-len 32 [ServerArgs flags, e.g. --load-format dummy]`.

One prefill of batch x input-len random tokens, then output-len - 1 greedy
decode steps; each shape runs once untimed first. `--correct` instead prints the greedy continuation of a few fixed
prompts, for eyeballing that the model is right.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from radixserve.benchmark.report import append_json_line, now_iso, print_grid
from radixserve.server_args import ServerArgs

CORRECT_PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:",
    "def fibonacci(n):",
]


@dataclass
class OneBatchResult:
    batch_size: int
    input_len: int
    output_len: int
    prefill_latency_s: float
    prefill_throughput: float  # prompt tokens per second
    median_decode_latency_s: Optional[float]  # None when output_len == 1
    decode_throughput: Optional[float]  # tokens per second at the median step
    mean_decode_latency_s: Optional[float]  # total = prefill + (output_len - 1) * mean
    total_latency_s: float
    overall_throughput: float  # (input + output tokens) per second


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m radixserve.bench_one_batch", allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1], help="batch sizes to time")
    parser.add_argument("--input-len", type=int, nargs="+", default=[1024], help="prompt lengths to time")
    parser.add_argument("--output-len", type=int, nargs="+", default=[16],
                        help="tokens per request: one from the prefill, the rest from decode steps")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random prompt tokens")
    parser.add_argument("--correct", action="store_true",
                        help="print greedy continuations of fixed prompts instead of timing")
    parser.add_argument("--output-file", default=None, help="append one JSON line per shape")
    return parser.parse_args(argv)


# ---- a static batch ----
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(runner: Any, prompts: List[List[int]], output_len: int) -> Tuple[Any, List[Any]]:
    """A ScheduleBatch of fresh requests, each planned to prefill its whole prompt."""
    from radixserve.managers.io_struct import TokenizedGenerateReqInput
    from radixserve.managers.req import Req
    from radixserve.managers.schedule_batch import ExtendPlan, ScheduleBatch
    from radixserve.sampling.sampling_params import SamplingParams

    reqs = []
    for i, ids in enumerate(prompts):
        params = SamplingParams.from_dict({"max_new_tokens": output_len, "temperature": 0.0})
        params.normalize()
        reqs.append(Req(TokenizedGenerateReqInput(rid=f"bench-{i}", input_ids=ids, sampling_params=params), 0))
    plans = [ExtendPlan(r, len(r.origin_input_ids), range(0), completes_prefill=True) for r in reqs]
    return ScheduleBatch(reqs, runner.pools, runner.device), plans


def release_memory(runner: Any) -> None:
    """Nothing else uses the pools here: hand every row and KV slot back at once."""
    runner.allocator.clear()
    pool = runner.pools.req_to_token_pool
    pool.free_rows = list(range(pool.size))


@torch.inference_mode()
def run_static_batch(runner: Any, prompts: List[List[int]],
                     output_len: int) -> Tuple[List[List[int]], float, List[float]]:
    """Greedy prefill + output_len - 1 decode steps. Returns (output ids per
    request, prefill seconds, list of decode-step seconds)."""
    batch, plans = make_batch(runner, prompts, output_len)
    try:
        synchronize(runner.device)
        start = time.perf_counter()
        if not batch.prepare_for_extend(plans):
            raise SystemExit("the KV cache cannot hold this batch; raise --max-total-tokens")
        next_ids = runner.forward(batch.to_forward_batch()).next_token_logits.argmax(-1)
        synchronize(runner.device)
        prefill = time.perf_counter() - start
        outputs, steps = [next_ids], []
        for _ in range(output_len - 1):
            start = time.perf_counter()
            batch.last_token_ids = next_ids
            if not batch.prepare_for_decode():
                raise SystemExit("the KV cache ran out while decoding; raise --max-total-tokens")
            next_ids = runner.forward(batch.to_forward_batch()).next_token_logits.argmax(-1)
            synchronize(runner.device)
            steps.append(time.perf_counter() - start)
            outputs.append(next_ids)
        return torch.stack(outputs, 1).tolist(), prefill, steps
    finally:
        release_memory(runner)


def time_shape(runner: Any, batch_size: int, input_len: int, output_len: int, seed: int) -> OneBatchResult:
    """Time one shape, after an untimed run of the very same shape.

    Why both the warm-up per shape and the mean: a run once printed a median
    decode step of 3.77 ms next to a total implying about 390 ms per step. The
    total sums every step, the median ignores the few slow ones, and the slow
    ones were most likely one-time costs of a shape not seen before (Triton compiles a
    kernel again when an argument changes specialization, e.g. a length that
    becomes a multiple of 16; the caching allocator grows), while only the
    first shape was warmed up, with a few steps. Now every shape is warmed up
    with its own length, and the table shows the mean step next to the median:
    total = prefill + (output_len - 1) * mean holds exactly, and a median far
    below the mean says that some steps still stalled."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, runner.vocab_size, (batch_size, input_len), generator=g).tolist()
    run_static_batch(runner, prompts, output_len)
    _, prefill, steps = run_static_batch(runner, prompts, output_len)
    median = statistics.median(steps) if steps else None
    mean = statistics.fmean(steps) if steps else None
    total = prefill + sum(steps)
    return OneBatchResult(
        batch_size, input_len, output_len, prefill, batch_size * input_len / prefill,
        median, batch_size / median if median else None, mean, total,
        batch_size * (input_len + output_len) / total,
    )


def check_fits(runner: Any, batch_size: int, input_len: int, output_len: int) -> None:
    tokens = batch_size * (input_len + output_len)
    if input_len + output_len > runner.context_len:
        raise SystemExit(f"input + output ({input_len + output_len}) exceeds the context length "
                         f"{runner.context_len}")
    if batch_size > runner.pools.req_to_token_pool.size:
        raise SystemExit(f"batch {batch_size} exceeds max running requests; raise --max-running-requests")
    if tokens > runner.max_total_num_tokens:
        raise SystemExit(f"batch needs {tokens} KV tokens, the cache has {runner.max_total_num_tokens}; "
                         f"raise --max-total-tokens")


# ---- the tool ----
def build_runner(args: argparse.Namespace) -> Any:
    from radixserve.model_executor.model_runner import ModelRunner

    server_args = ServerArgs.from_cli_args(args)
    if server_args.max_running_requests is None:
        # A static batch is all that runs: rows for the largest batch suffice.
        server_args.max_running_requests = max(*args.batch_size, len(CORRECT_PROMPTS))
    return ModelRunner(server_args)


def print_correct(runner: Any, output_len: int) -> List[str]:
    from radixserve.utils.hf_utils import load_tokenizer

    tokenizer = load_tokenizer(runner.source, runner.server_args.tokenizer_path)
    prompts = [tokenizer.encode(p) for p in CORRECT_PROMPTS]
    outputs, _, _ = run_static_batch(runner, prompts, output_len)
    texts = [tokenizer.decode(ids) for ids in outputs]
    for prompt, text in zip(CORRECT_PROMPTS, texts):
        print(f"{prompt!r} -> {text!r}")
    return texts


def print_results(results: List[OneBatchResult]) -> None:
    headers = ["batch", "input", "output", "prefill ms", "prefill tok/s", "decode ms (median)",
               "decode tok/s", "decode ms (mean)", "total ms", "overall tok/s"]
    rows = [[r.batch_size, r.input_len, r.output_len, r.prefill_latency_s * 1000, r.prefill_throughput,
             milliseconds(r.median_decode_latency_s), r.decode_throughput,
             milliseconds(r.mean_decode_latency_s), r.total_latency_s * 1000, r.overall_throughput]
            for r in results]
    print_grid(headers, rows)


def milliseconds(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1000


def main(argv: Optional[Sequence[str]] = None) -> List[OneBatchResult]:
    args = parse_args(argv)
    runner = build_runner(args)
    if args.correct:
        print_correct(runner, max(args.output_len))
        return []
    shapes = list(itertools.product(args.batch_size, args.input_len, args.output_len))
    for shape in shapes:
        check_fits(runner, *shape)
    results = [time_shape(runner, *shape, args.seed) for shape in shapes]
    print_results(results)
    args_used = runner.server_args
    common: Dict[str, Any] = {"tool": "bench_one_batch", "date": now_iso(), "model_path": args_used.model_path,
                              "load_format": args_used.load_format, "dtype": str(runner.dtype),
                              "device": str(runner.device)}
    for r in results:
        append_json_line(args.output_file, {**common, **asdict(r)})
    return results


if __name__ == "__main__":
    main()
