"""Shared by the weight-update and RL tests: the prompts, an engine on the tiny
Llama together with transformers' old and new weights, and a long request
started in the background."""

from __future__ import annotations

import copy
import threading
import time

import torch

from radixserve import Engine
from tests.conftest import load_hf_model

PROMPTS = [[15, 400, 2311, 98, 7], [1200, 64, 3, 9, 77, 512, 41]]
STEPS = 12
GREEDY = {"temperature": 0, "max_new_tokens": STEPS, "ignore_eos": True}


def perturbed_copy(hf_model, seed: int):
    """A copy of a transformers model with new random weights (norms near 1)."""
    new = copy.deepcopy(hf_model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return new


def engine_with_new_weights(tiny_model_factory, tmp_path_factory, seed: int):
    """(engine on the tiny Llama, its path, transformers' old model, a new one, the new one saved)."""
    path = tiny_model_factory("llama")
    old = load_hf_model(path)
    new = perturbed_copy(old, seed)
    new_path = tmp_path_factory.mktemp("new_weights")
    new.save_pretrained(new_path)
    with Engine(model_path=str(path), log_level="warning") as engine:
        yield engine, path, old, new, new_path


def start_long_request(engine, result: dict, tokens: int) -> threading.Thread:
    params = {**GREEDY, "max_new_tokens": tokens}
    thread = threading.Thread(target=lambda: result.update(
        engine.generate(input_ids=PROMPTS[0], sampling_params=params)), daemon=True)
    thread.start()
    # (bounded: an engine left released by a failed test would queue the request forever)
    deadline = time.monotonic() + 60
    while engine.get_server_info()["num_running_reqs"] == 0 and thread.is_alive() and time.monotonic() < deadline:
        pass
    return thread
