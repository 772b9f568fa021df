"""Speculative decoding through CUDA graphs (the verify step and the draft
model's forwards replay graphs captured at start-up): greedy tokens equal to
decoding without speculation, for STANDALONE with the target as its own draft
(every draft accepted) and for EAGLE-3 and EAGLE-1/2 with untrained heads
(drafts rejected: both ends of the accepted-run range), and the graphs were used.
float32 keeps the verify step's and the decode step's kernels from
disagreeing on a near tie of the tiny random model."""

from __future__ import annotations

import random

import pytest
import torch

from radixserve import Engine
from tests.conftest import assert_no_leak, write_eagle_head

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
NUM_STEPS = 3


def prompts():
    rng = random.Random(7)
    return [[rng.randrange(10, 1000) for _ in range(rng.randint(4, 30))] for _ in range(5)]


def greedy(engine) -> list:
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in (40, 33, 7, 25, 18)]
    return [o["output_ids"] for o in engine.generate(input_ids=prompts(), sampling_params=params)]


def engine_for(target, **kwargs) -> Engine:
    return Engine(model_path=str(target), log_level="warning", dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def target(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def untrained_head(target, tmp_path_factory):
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.models.llama_eagle3 import aux_layer_ids
    from radixserve.server_args import ServerArgs
    from radixserve.train_eagle3 import head_config, init_head, save_head

    runner = ModelRunner(ServerArgs(model_path=str(target), device="cpu", max_total_tokens=64,
                                    max_running_requests=2), warm_up=False)
    config = head_config(runner.config, 128, aux_layer_ids(runner.config.num_hidden_layers))
    out = tmp_path_factory.mktemp("untrained_head")
    save_head(init_head(config, runner, torch.arange(128), "cpu"), config, out, torch.float32)
    return out


@pytest.fixture(scope="module")
def plain_tokens(target):
    with engine_for(target) as engine:
        return greedy(engine)


@pytest.mark.parametrize("algorithm", ["STANDALONE", "EAGLE3", "EAGLE"])
def test_graphed_speculation_keeps_greedy_tokens(algorithm, target, untrained_head, plain_tokens, tmp_path):
    draft = {"STANDALONE": lambda: target, "EAGLE3": lambda: untrained_head,
             "EAGLE": lambda: write_eagle_head(target, tmp_path / "eagle_head")}[algorithm]()
    with engine_for(target, speculative_algorithm=algorithm, speculative_draft_model_path=str(draft),
                    speculative_num_steps=NUM_STEPS, disable_speculative_adaptive=True) as engine:
        assert greedy(engine) == plain_tokens
        info = engine.get_server_info()["speculative"]
        assert_no_leak(engine)
    assert info["graph_replays"]["target"] > 0 and info["graph_replays"]["draft"] > 0
    if algorithm == "STANDALONE":  # the target as its own draft: every draft accepted
        assert info["mean_accept_length"] > NUM_STEPS
