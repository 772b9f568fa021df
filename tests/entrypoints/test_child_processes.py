"""How the children start: spawned children (the CUDA path) outlive the
runtime's start-up, and the launcher does not import the scheduler's modules."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import time

from radixserve import Engine
from radixserve.entrypoints import runtime


def test_spawned_children_serve_after_start(tiny_model_factory, monkeypatch):
    # On CUDA the children are spawned, and each dies with the thread that started
    # it (PDEATHSIG): started from a short-lived worker thread, they were killed
    # as soon as the start-up finished. The CPU normally forks them from the fork
    # server instead, so this test asks for spawn.
    monkeypatch.setattr(runtime, "process_context", lambda args: mp.get_context("spawn"))
    # A slow tokenizer load: the children are surely running (and have set
    # PDEATHSIG) before the start-up's threads finish.
    load_tokenizer = runtime.load_frontend_tokenizer
    monkeypatch.setattr(runtime, "load_frontend_tokenizer", lambda *a: (time.sleep(3), load_tokenizer(*a))[1])
    with Engine(model_path=str(tiny_model_factory("llama")), log_level="warning") as engine:
        out = engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 3, "ignore_eos": True})
        assert len(out["output_ids"]) == 3


def test_launcher_modules_leave_the_scheduler_to_the_children():
    code = ("import sys, radixserve.entrypoints.runtime, radixserve.entrypoints.child_processes\n"
            "print(any(m.startswith('radixserve.managers.scheduler') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
