"""bench/gpu_compare.py --smoke end to end on a CPU: our engine and transformers on
tiny Llama (untied) and Qwen3 (tied) shapes, both workloads, and a JSON whose
counts are the tokens the engines really returned."""

from __future__ import annotations

import json
import math
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
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)  # a hang guard only
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["engine_args"] == {"disable_radix_cache": True}  # coerced to a bool
    work = report["workload"]
    # Timings are measured on a shared machine: the test checks that each is a
    # finite number and that the derived figures follow from them, never their
    # size or sign (bs1_ms is a difference of two timed runs: noise can make it negative).
    assert all(is_number(report["card"][k]) for k in ("copy_GBps", "bf16_TFLOPs"))
    for name in ("llama8b", "qwen0.6b"):
        model = report["models"][name]
        for side in ("radixserve", "transformers"):
            res = model[side]
            assert "offline_error" not in res, res
            assert res["offline_output_tokens"] == work["num_requests"] * work["output_len"]
            assert is_number(res["offline_tok_s"]) and is_number(res["bs1_ms"])
        assert model["shape"]["tied"] == (name == "qwen0.6b")
    rows = report["rows"]
    assert [(r["model"], r["metric"]) for r in rows] == [
        ("llama8b", "output tok/s"), ("llama8b", "ms/token"), ("qwen0.6b", "output tok/s"), ("qwen0.6b", "ms/token")]
    for r in rows:
        assert all(is_number(r[k]) for k in ("radixserve", "transformers", "roofline"))
        side = report["models"][r["model"]]
        key = "bs1_ms" if r["metric"] == "ms/token" else "offline_tok_s"
        assert (r["radixserve"], r["transformers"]) == (side["radixserve"][key], side["transformers"][key])
        if r["radixserve"] and r["transformers"]:  # the report leaves a ratio out where one side is 0
            expected = (r["transformers"] / r["radixserve"] if r["metric"] == "ms/token"
                        else r["radixserve"] / r["transformers"])
            assert abs(r["ratio"] - round(expected, 2)) < 1e-9
        if r["radixserve"]:
            fraction = r["roofline"] / r["radixserve"] if r["metric"] == "ms/token" else r["radixserve"] / r["roofline"]
            assert abs(r["fraction_of_roofline"] - round(fraction, 3)) < 1e-9
    assert "| llama8b | batch-1 decode |" in proc.stdout  # the printed table


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
