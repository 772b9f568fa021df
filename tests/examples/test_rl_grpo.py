"""examples/rl_grpo.py, run as a user would: the reward rises, the engine
samples with exactly the trainer's weights after every push, and two
deterministic runs with the same seed are identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rl_grpo.py"


def run_example(out: Path) -> tuple:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--short", "--deterministic", "--seed", "3", "--json-out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    step_lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    return json.loads(out.read_text()), step_lines


def test_grpo_reward_rises_and_deterministic_runs_repeat(tmp_path):
    first, first_lines = run_example(tmp_path / "first.json")
    steps = first["steps"]
    assert len(steps) == len(first_lines) >= 10
    assert first["last_mean_reward"] > first["first_mean_reward"] + 0.2, (first["first_mean_reward"],
                                                                          first["last_mean_reward"])
    # The engine's log-probs of its own samples equal the trainer's on the same
    # tokens: every update_weights_from_tensor landed before the next rollout.
    assert max(s["max_logprob_gap"] for s in steps) < 1e-4
    group = int(first["args"]["group_size"])
    assert all(len(s["rollouts"]) == group * int(first["args"]["num_prompts"]) for s in steps)

    second, second_lines = run_example(tmp_path / "second.json")
    assert second["steps"] == steps
    assert second_lines == first_lines
