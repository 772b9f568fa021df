"""bench/gpu_serve.py --smoke end to end on a CPU: the server starts on tiny
shapes, each workload's requests all complete with the tokens they asked for,
and the JSON lines say which workload and server flags they came from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_smoke_run_completes_every_request(tmp_path):
    out = tmp_path / "serve.jsonl"
    cmd = [sys.executable, str(REPO / "bench" / "gpu_serve.py"), "--smoke", "--out", str(out),
           "--workloads", "serial,c64", "--label", "smoke"]
    if os.environ.get("RADIXSERVE_TEST_TOKENIZER_DIR"):
        cmd += ["--tokenizer-dir", os.environ["RADIXSERVE_TEST_TOKENIZER_DIR"]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)  # a hang guard only
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["workload"] for r in records] == ["serial", "c64"]
    for r, (requests, output_len) in zip(records, [(3, 8), (8, 16)]):
        assert r["label"] == "smoke" and r["completed"] == requests and r["failed"] == 0
        assert r["total_output_tokens"] == requests * output_len  # ignore_eos: every token asked for
    assert "serial" in proc.stdout and "c64" in proc.stdout  # the printed table
