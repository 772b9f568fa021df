"""The CUDA path's Triton kernels compile for Hopper (sm_90), PDL on, on a
machine without a GPU (hopper_compile.py says how). The interpreter that runs
the other kernel tests never compiles, so a kernel change that only the
compiler rejects would otherwise first fail on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.layers.hopper_compile import CASES

ROOT = Path(__file__).resolve().parents[2]


def test_the_cuda_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for this process
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    done = subprocess.run([sys.executable, "-m", "tests.layers.hopper_compile"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    errors = {case: result for case, result in results.items() if isinstance(result, str)}
    assert not errors, "\n\n".join(f"{case}: {error}" for case, error in errors.items())
    assert set(results) == set(CASES) and all(results.values())
    compiled = set().union(*results.values())
    # the batch-1 decode chain of every family (norms, rope, cache writes, GEMVs, attention, MoE)
    assert {"_rmsnorm_kernel", "_rotary_kernel", "_store_kv_kernel", "_gemv_kernel", "_decode_split_kernel",
            "decode_merge_kernel", "_mla_latent_kv_kernel", "_mla_decode_split_kernel", "_query_to_latent_kernel",
            "_latent_to_value_kernel", "_routing_kernel", "_gate_up_kernel", "_down_kernel"} <= compiled
