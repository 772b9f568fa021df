"""Where a CPU decode step of the default model spends its time.

    python bench/cpu_step_profile.py [--batch 32] [--context 160] [--steps 20]

Builds the model runner as `make serve` does, prefills `batch` requests of
`context` tokens, then times greedy decode steps, with a timer around each
fused kernel (layers/cpu_kernels.py) and each quantized linear's matmul (the
LM head's included; the AMX kernels' time is also inside these). Prints
milliseconds a step for each and the step's total; what is left is the
embedding, sampling, metadata and Python. No assertions: a tool for the
profiles quoted in docs/benchmarks.md.
"""
import argparse
import collections
import dataclasses
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from radixserve.bench_one_batch import make_batch
from radixserve.layers import cpu_kernels
from radixserve.model_executor.model_runner import ModelRunner
from radixserve.server_args import ServerArgs

KERNELS = ["decode_attention", "rms_norm", "silu_and_mul", "rotary", "int4_linear_amx", "int8_linear_amx",
           "gumbel_argmax"]


def timed(seconds: dict, calls: collections.Counter, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start
            calls[name] += 1
    return wrapper


def install_timers(runner: ModelRunner, seconds: dict, calls: collections.Counter) -> None:
    for name in KERNELS:
        setattr(cpu_kernels, name, timed(seconds, calls, name, getattr(cpu_kernels, name)))
    # A weight format holds its matmul function itself: each quantized module gets a timed copy.
    for module in runner.model.modules():
        fmt = getattr(module, "weight_format", None)
        if fmt is not None:
            name = f"{fmt.matmul.__name__} ({type(module).__name__})"
            module.weight_format = dataclasses.replace(fmt, matmul=timed(seconds, calls, name, fmt.matmul))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=160)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    bs, context = args.batch, args.context
    runner = ModelRunner(ServerArgs(model_path=None, max_running_requests=max(bs, 8)))
    prompts = [[100 + (7 * i + j) % 1000 for j in range(context)] for i in range(bs)]
    batch, plans = make_batch(runner, prompts, args.steps + 8)
    batch.prepare_for_extend(plans)
    out = runner.forward(batch.to_forward_batch())
    batch.last_token_ids = out.next_token_logits.max(dim=-1).indices

    def step() -> None:
        batch.prepare_for_decode()
        logits = runner.forward(batch.to_forward_batch())
        batch.last_token_ids = logits.next_token_logits.max(dim=-1).indices

    for _ in range(3):  # packed copies made, caches warm
        step()
    seconds, calls = collections.defaultdict(float), collections.Counter()
    install_timers(runner, seconds, calls)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    total = (time.perf_counter() - start) / args.steps
    print(f"batch {bs}, {context}-token prompts, {torch.get_num_threads()} threads: {total * 1e3:.2f} ms a step")
    for name, value in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"  {name:52s} {value / args.steps * 1e3:7.2f} ms  ({calls[name] // args.steps} calls)")


if __name__ == "__main__":
    main()
