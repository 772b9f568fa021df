"""One prefill + one decode server vs two ordinary workers, each behind SGLang's
gateway, on the same workload in the same run.

    .venv/bin/python bench/pd_vs_workers.py [--input-len 1024 --output-len 64 --num-prompts 24
                                             --request-rate 0.25 --model-path SmolLM2-135M-Instruct]

For each setup a cluster is started with radixserve.launch_cluster (1P1D:
--prefill-workers 1 --decode-workers 1, the gateway in --pd-disaggregation
mode; else --workers 2), our bench_serving (--backend sglang, --dataset-name
random, long prompts at a steady Poisson rate) is sent through the gateway,
and the cluster is stopped. Prints one JSON line per setup: inter-token
latency p50/p99, TTFT, throughput. Disaggregation exists to keep long prefills
from stalling running decodes; on one machine with shared cores both servers
compete for the same compute, so read the numbers with that in mind.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.gateway_utils import start_cluster  # noqa: E402

SETUPS = {"1P1D": dict(workers=1, pd=(1, 1)), "2 workers": dict(workers=2, pd=(0, 0))}
KEYS = ("completed", "failed", "duration_s", "request_throughput", "output_throughput", "median_itl_ms",
        "p99_itl_ms", "mean_itl_ms", "median_ttft_ms", "p99_ttft_ms")


def run_setup(name: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as logs:
        cluster = start_cluster(args.model_path, Path(logs), "--log-level", "warning", policy="round_robin",
                                timeout_s=600, **SETUPS[name])
        try:
            tokenizer = httpx.get(f"{cluster.worker_urls[0]}/model_info", timeout=60).json()["tokenizer_path"]
            with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
                subprocess.run([sys.executable, "-m", "radixserve.bench_serving", "--backend", "sglang",
                                "--base-url", cluster.url, "--tokenizer", tokenizer, "--dataset-name", "random",
                                "--random-input-len", str(args.input_len), "--random-output-len",
                                str(args.output_len), "--random-range-ratio", "1.0", "--num-prompts",
                                str(args.num_prompts), "--request-rate", str(args.request_rate),
                                "--seed", str(args.seed), "--output-file", out.name],
                               check=True, stdout=subprocess.DEVNULL)
                result = json.loads(Path(out.name).read_text().splitlines()[-1])
        finally:
            cluster.stop()
    return {"setup": name, **{k: result.get(k) for k in KEYS}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default="SmolLM2-135M-Instruct")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--request-rate", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    args = parser.parse_args()
    for name in args.setups:
        print(json.dumps(run_setup(name, args)), flush=True)


if __name__ == "__main__":
    main()
