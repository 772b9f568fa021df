"""The HTTP server under the serving issue's three loads, in one command.

    python bench/gpu_serve.py --tokenizer-dir DIR --out serve.jsonl [--model llama8b]
        [--workloads burst,serial,c64] [--label NAME] [--server-arg=--enable-mixed-chunk ...]
    python bench/gpu_serve.py --smoke --out smoke.jsonl   # tiny shapes and counts; runs on a CPU

Starts `radixserve.launch_server` with random ("dummy") weights of the model's
real shapes, waits for /health, drives it with our bench_serving (`--backend
sglang --dataset-name random`, each workload after bench_serving's warm-up
request and with the prefix cache flushed) and stops it. Workloads:

    burst   1,000 requests sent at once, input 512-1,024 and output 128-256 tokens
    serial  one request at a time, 32 prompts of 128 tokens, 128 new
    c64     64 at a time, 256 prompts of 512 tokens, 256 new

Appends one JSON line per workload to --out (bench_serving's record, plus the
label, the model and the server's flags) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_shapes import model_config, save_default_tokenizer  # noqa: E402
from gpu_compare import model_dir  # noqa: E402
from radixserve.bench_serving import parse_args, run_benchmark  # noqa: E402
from radixserve.benchmark.report import append_json_line, print_grid  # noqa: E402
from tests.server_utils import free_port, launch_on_port, stop_server  # noqa: E402

# name -> (requests, input len, output len, range ratio, max concurrency or None: all at once)
WORKLOADS: Dict[str, tuple] = {
    "burst": (1000, 1024, 256, 0.5, None),
    "serial": (32, 128, 128, 1.0, 1),
    "c64": (256, 512, 256, 1.0, 64),
}
SMOKE_WORKLOADS: Dict[str, tuple] = {
    "burst": (12, 64, 16, 0.5, None),
    "serial": (3, 16, 8, 1.0, 1),
    "c64": (8, 32, 16, 1.0, 4),
}
COLUMNS = [("label", "label"), ("workload", "workload"), ("done", "completed"), ("s", "duration_s"),
           ("out tok/s", "output_throughput"), ("total tok/s", "total_throughput"),
           ("TTFT med ms", "median_ttft_ms"), ("ITL med ms", "median_itl_ms"), ("ITL p99 ms", "p99_itl_ms"),
           ("TPOT med ms", "median_tpot_ms")]


def bench_args(url: str, tokenizer: Path, spec: tuple) -> List[str]:
    requests, input_len, output_len, ratio, concurrency = spec
    argv = ["--backend", "sglang", "--base-url", url, "--tokenizer", str(tokenizer), "--dataset-name", "random",
            "--num-prompts", str(requests), "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--random-range-ratio", str(ratio), "--flush-cache"]
    return argv + (["--max-concurrency", str(concurrency)] if concurrency else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama8b", help="a shape from bench_shapes.py")
    p.add_argument("--tokenizer-dir", type=Path, help="default: the embedded model's tokenizer")
    p.add_argument("--out", required=True, help="JSON lines, appended")
    p.add_argument("--workloads", default="burst,serial,c64")
    p.add_argument("--label", default="default", help="names this run's rows (e.g. the flags it tries)")
    p.add_argument("--server-arg", action="append", default=[], help="one launch_server argument, repeatable")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and counts; runs on a CPU")
    args = p.parse_args()
    workloads = SMOKE_WORKLOADS if args.smoke else WORKLOADS
    names = args.workloads.split(",")
    unknown = [n for n in names if n not in workloads]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}: {' | '.join(workloads)}")

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = save_default_tokenizer(Path(tmp) / "tokenizer", args.tokenizer_dir)
        folder = model_dir(args.model, model_config(args.model, args.smoke), tokenizer, Path(tmp))
        port = free_port()
        server = launch_on_port(folder, port, "--load-format", "dummy", *args.server_arg,
                                log=sys.stderr, timeout_s=900)
        rows = []
        try:
            for name in names:
                result = run_benchmark(parse_args(bench_args(f"http://127.0.0.1:{port}", tokenizer, workloads[name])))
                record = {**result.record, "label": args.label, "workload": name, "model_shape": args.model,
                          "server_args": args.server_arg}
                append_json_line(args.out, record)
                rows.append([record.get(key) for _, key in COLUMNS])
        finally:
            stop_server(server)
    print_grid([title for title, _ in COLUMNS], rows)
    print(json.dumps({"out": args.out, "rows": len(rows)}))


if __name__ == "__main__":
    main()
