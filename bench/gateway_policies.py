"""Two radixserve workers behind SGLang's gateway: cache_aware vs round_robin
routing on a shared-prefix workload, in the same run.

    .venv/bin/python bench/gateway_policies.py [--groups 8 --per-group 8 --system-len 512 ...]

The workers start once; for each policy a fresh gateway (sglang_router) is put in
front of them, both workers' prefix caches are flushed, and our bench_serving
(--dataset-name generated-shared-prefix, all requests at once) is sent through
the gateway. Reports the cache hit rate (cached prompt tokens / prompt tokens,
from the responses), the prompt tokens each worker actually computed, and the
throughput. Prints one JSON line per policy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.server_utils import free_port, launch_on_port  # noqa: E402


def start_router(policy: str, workers: list, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                             "--port", str(port), "--policy", policy, "--log-level", "warn",
                             "--worker-urls", *workers], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("the gateway did not become healthy")


def prefill_computed(workers: list) -> list:
    return [httpx.get(f"{w}/get_server_info", timeout=30).json()["num_prefill_tokens"] for w in workers]


def run_policy(policy: str, workers: list, tokenizer: str, args: argparse.Namespace) -> dict:
    for w in workers:
        httpx.post(f"{w}/flush_cache", timeout=30).raise_for_status()
    before = prefill_computed(workers)
    port = free_port()
    router = start_router(policy, workers, port)
    try:
        with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
            subprocess.run([sys.executable, "-m", "radixserve.bench_serving", "--backend", "sglang",
                            "--base-url", f"http://127.0.0.1:{port}", "--tokenizer", tokenizer,
                            "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(args.groups),
                            "--gsp-prompts-per-group", str(args.per_group), "--gsp-system-prompt-len",
                            str(args.system_len), "--gsp-question-len", str(args.question_len),
                            "--gsp-output-len", str(args.output_len), "--max-concurrency", str(args.concurrency),
                            "--output-file", out.name], check=True, stdout=subprocess.DEVNULL)
            result = json.loads(Path(out.name).read_text().splitlines()[-1])
    finally:
        router.terminate()
        router.wait(timeout=30)
    computed = [a - b for a, b in zip(prefill_computed(workers), before)]
    return {"policy": policy, "completed": result.get("completed"),
            "cache_hit_rate": result.get("cache_hit_rate"),
            "request_throughput": result.get("request_throughput"),
            "output_throughput": result.get("output_throughput"),
            "duration_s": result.get("duration_s"),
            "prefill_tokens_computed_per_worker": computed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default="SmolLM2-135M-Instruct")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--per-group", type=int, default=8)
    parser.add_argument("--system-len", type=int, default=512)
    parser.add_argument("--question-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin"])
    args = parser.parse_args()
    ports = [free_port() for _ in range(2)]
    procs = [launch_on_port(args.model_path, p, "--log-level", "warning") for p in ports]
    workers = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        tokenizer = httpx.get(f"{workers[0]}/model_info", timeout=60).json()["tokenizer_path"]
        for policy in args.policies:
            print(json.dumps(run_policy(policy, workers, tokenizer, args)), flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
