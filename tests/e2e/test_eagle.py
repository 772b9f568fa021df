"""EAGLE-1/2 heads end to end (--speculative-algorithm EAGLE) on a tiny random
Llama with a random head in the EAGLE authors' layout: greedy tokens equal
transformers', as a chain, as top-K trees and with a token map; seeded
sampled tokens equal plain decoding's; both KV pools balance after the runs
and after an abort; a folder that is not an EAGLE head is refused. A head
that `train_eagle3 --head eagle` trains for a few steps gets drafts accepted
through the token map it writes."""

from __future__ import annotations

import random

import pytest
import torch

from radixserve import Engine
from radixserve.train_eagle3 import main as train_eagle3
from tests.conftest import assert_draft_kv_balanced, assert_no_leak, generate_then_abort, hf_greedy, load_hf_model, write_eagle_head
from tests.e2e.test_eagle3 import train_prompts

NEW_TOKENS = 12
SAMPLED = {"temperature": 0.9, "top_p": 0.9, "sampling_seed": 5, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


def prompts():
    rng = random.Random(3)
    return [[rng.randrange(10, 1000) for _ in range(rng.randint(4, 24))] for _ in range(3)]


@pytest.fixture(scope="module")
def target(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def head(target, tmp_path_factory):
    return write_eagle_head(target, tmp_path_factory.mktemp("eagle_head"), seed=4)


@pytest.fixture(scope="module")
def expected(target):
    """(transformers' greedy tokens, plain decoding's seeded sampled tokens)."""
    greedy = hf_greedy(load_hf_model(target), prompts(), NEW_TOKENS)
    with Engine(model_path=str(target), log_level="warning") as engine:
        sampled = engine.generate(input_ids=prompts(), sampling_params=SAMPLED)
    return greedy, [o["output_ids"] for o in sampled]


def run(engine) -> tuple:
    greedy = engine.generate(input_ids=prompts(), sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS,
                                                                    "ignore_eos": True})
    sampled = engine.generate(input_ids=prompts(), sampling_params=SAMPLED)
    return [o["output_ids"] for o in greedy], [o["output_ids"] for o in sampled]


def assert_pools_balanced(engine) -> None:
    assert_no_leak(engine)
    assert_draft_kv_balanced(engine)


@pytest.mark.parametrize("flags", [
    dict(),  # a chain of 3 drafts
    dict(speculative_eagle_topk=2, speculative_num_draft_tokens=6),  # top-2 trees
    dict(token_map=True),  # the draft vocabulary narrowed to 64 tokens
])
def test_eagle_head_keeps_tokens(target, head, expected, flags, tmp_path):
    flags = dict(flags)
    if flags.pop("token_map", False):
        torch.save(torch.randperm(1000, generator=torch.Generator().manual_seed(2))[:64], tmp_path / "hot.pt")
        flags["speculative_token_map"] = str(tmp_path / "hot.pt")
    with Engine(model_path=str(target), log_level="warning", speculative_algorithm="EAGLE",
                speculative_draft_model_path=str(head), speculative_num_steps=3,
                disable_speculative_adaptive=True, **flags) as engine:
        assert run(engine) == expected
        spec = engine.get_server_info()["speculative"]
        assert_pools_balanced(engine)
        out = generate_then_abort(engine, prompts()[0], "eagle-abort")
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert_pools_balanced(engine)
    assert spec["algorithm"] == "EAGLE" and spec["verify_ct"] > 0, spec
    assert spec["trees"] == ("speculative_eagle_topk" in flags), spec


def test_not_an_eagle_head_is_refused(target, tmp_path):
    with pytest.raises(Exception, match="not an EAGLE head"):
        Engine(model_path=str(target), log_level="warning", speculative_algorithm="EAGLE",
               speculative_draft_model_path=str(target))


def test_trained_head_accepts_and_keeps_tokens(target, tmp_path):
    head = tmp_path / "trained"
    train_eagle3(["--model-path", str(target), "--output-dir", str(head), "--head", "eagle", "--prompts", "random",
                  "--num-prompts", "3", "--max-new-tokens", "16", "--temperature", "0", "--draft-vocab-size", "128",
                  "--epochs", "12", "--window", "64", "--lr", "2e-2", "--save-dtype", "float32"])
    assert torch.load(head / "token_map.pt").shape == (128,)
    prompts = train_prompts(3)
    with Engine(model_path=str(target), log_level="warning", speculative_algorithm="EAGLE",
                speculative_draft_model_path=str(head), speculative_token_map=str(head / "token_map.pt"),
                speculative_num_steps=3, disable_speculative_adaptive=True) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 16})
        assert_pools_balanced(engine)
    assert [o["output_ids"] for o in outs] == hf_greedy(load_hf_model(target), prompts, 16)
    rates = [o["meta_info"]["spec_accept_rate"] for o in outs]
    assert sum(rates) / len(rates) > 0.15, rates  # 0.35 seen; a random head gets ~0
