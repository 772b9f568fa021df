"""--enable-mixed-chunk: a prefill (chunk) and the running requests' decode step
in one forward give the same tokens as alternating prefill and decode forwards
(greedy and seeded sampling), logprobs within 1e-5 (CPU BLAS results move with
the row count), and greedy tokens equal to transformers'. Retraction and aborts
under mixed batches: tests/managers/test_scheduler_policies.py."""

from __future__ import annotations

import random
from typing import Dict, List, Tuple

import pytest

from radixserve import Engine
from radixserve.server_args import ServerArgs
from tests.conftest import assert_no_leak, hf_greedy, load_hf_model
from tests.models.deepseek_tiny import build_deepseek

LOGPROB_TOL = 1e-5


def workload(vocab: int) -> Tuple[List[List[int]], List[Dict]]:
    """Prompts of 3..90 tokens (several chunks of 24), half greedy, half seeded samples."""
    rng = random.Random(3)
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(3, 90))] for _ in range(12)]
    params = [{"max_new_tokens": rng.randint(6, 16), "ignore_eos": True,
               **({"temperature": 0.0} if i % 2 == 0 else
                  {"temperature": 0.9, "top_p": 0.9, "sampling_seed": rng.randrange(1 << 30)})}
              for i in range(len(prompts))]
    return prompts, params


def run(path, mixed: bool, **engine_args) -> Tuple[list, dict]:
    prompts, params = workload(1000)
    engine_args = {"chunked_prefill_size": 24, **engine_args}
    with Engine(model_path=str(path), enable_mixed_chunk=mixed, log_level="warning", **engine_args) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True, logprob_start_len=0)
        info = engine.get_server_info()
        assert_no_leak(engine)
    return outs, info


def logprobs(out: dict, key: str) -> List[float]:
    return [lp for lp, _, _ in out["meta_info"][key] if lp is not None]


def assert_same(mixed: list, alternating: list) -> None:
    for m, a in zip(mixed, alternating):
        assert m["output_ids"] == a["output_ids"]
        for key in ("output_token_logprobs", "input_token_logprobs"):
            got, want = logprobs(m, key), logprobs(a, key)
            assert len(got) == len(want) and max((abs(x - y) for x, y in zip(got, want)), default=0) < LOGPROB_TOL


@pytest.fixture(scope="module")
def llama(tiny_model_factory):
    path = tiny_model_factory("llama")
    return path, run(path, mixed=True), run(path, mixed=False)


def test_mixed_batches_run_only_when_asked(llama):
    _, (_, mixed_info), (_, alternating_info) = llama
    assert mixed_info["num_mixed_batches"] > 0
    assert alternating_info["num_mixed_batches"] == 0


def test_mixed_gives_the_tokens_of_alternating_batches(llama):
    _, (mixed, _), (alternating, _) = llama
    assert_same(mixed, alternating)


def test_mixed_greedy_matches_transformers(llama):
    path, (mixed, _), _ = llama
    prompts, params = workload(1000)
    greedy = [i for i, p in enumerate(params) if p["temperature"] == 0.0]
    want = hf_greedy(load_hf_model(path), [prompts[i] for i in greedy], 6)
    assert [mixed[i]["output_ids"][:6] for i in greedy] == want


def test_mixed_multi_head_latent_attention(tmp_path, embedded_tokenizer_dir):
    # MLA's extend path (latent cache, prefix on top) serves the decode rows.
    build_deepseek("v2", 1000, tmp_path, embedded_tokenizer_dir)
    (mixed, info), (alternating, _) = run(tmp_path, mixed=True), run(tmp_path, mixed=False)
    assert info["num_mixed_batches"] > 0
    assert_same(mixed, alternating)


def test_mixed_refuses_deterministic_inference():
    with pytest.raises(ValueError, match="enable_mixed_chunk"):
        ServerArgs(model_path="x", enable_mixed_chunk=True, enable_deterministic_inference=True)
