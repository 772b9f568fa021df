"""bench/gpu_compare.py --smoke end to end on a CPU: our engine and transformers on
tiny Llama (untied) and Qwen3 (tied) shapes, both workloads, and a JSON whose
counts are the tokens the engines really returned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_smoke_run_reports_every_model_and_workload(tmp_path):
    out = tmp_path / "smoke.json"
    cmd = [sys.executable, str(REPO / "bench" / "gpu_compare.py"), "--smoke", "--out", str(out),
           "--work-dir", str(tmp_path / "work"), "--engine-arg", "disable_radix_cache=true"]
    if os.environ.get("RADIXSERVE_TEST_TOKENIZER_DIR"):
        cmd += ["--tokenizer-dir", os.environ["RADIXSERVE_TEST_TOKENIZER_DIR"]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["engine_args"] == {"disable_radix_cache": True}  # coerced to a bool
    work = report["workload"]
    assert report["card"]["copy_GBps"] > 0 and report["card"]["bf16_TFLOPs"] > 0
    for name in ("llama8b", "qwen0.6b"):
        model = report["models"][name]
        for side in ("radixserve", "transformers"):
            res = model[side]
            assert "offline_error" not in res, res
            assert res["offline_output_tokens"] == work["num_requests"] * work["output_len"]
            assert res["offline_tok_s"] > 0 and res["bs1_ms"] > 0
        assert model["shape"]["tied"] == (name == "qwen0.6b")
    rows = report["rows"]
    assert [(r["model"], r["metric"]) for r in rows] == [
        ("llama8b", "output tok/s"), ("llama8b", "ms/token"), ("qwen0.6b", "output tok/s"), ("qwen0.6b", "ms/token")]
    for r in rows:
        assert r["roofline"] > 0 and r["fraction_of_roofline"] > 0
        expected = (r["transformers"] / r["radixserve"] if r["metric"] == "ms/token"
                    else r["radixserve"] / r["transformers"])
        assert abs(r["ratio"] - round(expected, 2)) < 1e-9
    assert "| llama8b | batch-1 decode |" in proc.stdout  # the printed table
