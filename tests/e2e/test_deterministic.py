"""--enable-deterministic-inference: one request's sampled tokens and logprobs are
bit-identical alone, inside batches of 1..16 other random requests, with
chunked prefill of 8 or 16 tokens or none, and after a radix-cache hit.
Without the flag the same matrix shows differences (batch-dependent GEMM paths)."""

from __future__ import annotations

import random
from typing import Dict, List, Tuple

import pytest
import torch

from radixserve import Engine
from tests.conftest import assert_no_leak
from tests.models.moe_tiny import build_moe_model

TARGET = {"temperature": 1.0, "sampling_seed": 1234, "max_new_tokens": 12, "ignore_eos": True}


def target_prompt(vocab: int) -> List[int]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(10, vocab, (37,), generator=g).tolist()


def others(count: int, vocab: int, seed: int) -> Tuple[List[List[int]], List[Dict]]:
    """Random companions: lengths 1..80, mixed sampling settings and lengths."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(1, 80))] for _ in range(count)]
    params = [{"temperature": rng.choice([0.0, 0.7, 1.0]), "top_p": rng.choice([1.0, 0.9]),
               "max_new_tokens": rng.randint(1, 20), "ignore_eos": True, "sampling_seed": rng.randrange(1 << 30)}
              for _ in range(count)]
    return prompts, params


def fingerprint(out: dict) -> Tuple:
    """Everything that must be identical: tokens and the exact logprob bits."""
    meta = out["meta_info"]
    return (tuple(out["output_ids"]), tuple(lp for lp, _, _ in meta["output_token_logprobs"]),
            tuple(lp for lp, _, _ in meta["input_token_logprobs"][1:]))


def run_target(engine: Engine, prompt: List[int], companions: int, seed: int) -> Tuple:
    prompts, params = others(companions, 2000, seed)
    position = random.Random(seed).randint(0, companions)  # anywhere in the batch
    prompts.insert(position, prompt)
    params.insert(position, TARGET)
    outs = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True, logprob_start_len=0)
    return fingerprint(outs[position])


def run_matrix(path, deterministic: bool, chunk: int | None, batch_sizes, **engine_args) -> Dict[str, Tuple]:
    results = {}
    with Engine(model_path=str(path) if path else None, enable_deterministic_inference=deterministic,
                chunked_prefill_size=chunk, log_level="warning", **engine_args) as engine:
        prompt = target_prompt(2000)
        engine.flush_cache()
        results["alone"] = run_target(engine, prompt, 0, 0)
        for n in batch_sizes:
            engine.flush_cache()
            results[f"with {n} others"] = run_target(engine, prompt, n, n)
        # A radix hit: the first 30 tokens are cached by a request that shares them.
        engine.flush_cache()
        engine.generate(input_ids=prompt[:30] + [11, 12], sampling_params={"max_new_tokens": 1})
        results["after a radix hit"] = run_target(engine, prompt, 3, 99)
        assert engine.get_server_info()["kv_cache"]["cached_tokens"] > 0
        assert_no_leak(engine)
    return results


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return tiny_model_factory("qwen3")


@pytest.fixture(scope="module")
def deterministic_reference(tiny):
    return run_matrix(tiny, True, None, range(1, 17))


def test_identical_alone_and_in_any_batch(deterministic_reference):
    reference = deterministic_reference["alone"]
    assert len(reference[0]) == TARGET["max_new_tokens"]
    for case, got in deterministic_reference.items():
        assert got == reference, case


@pytest.mark.parametrize("chunk", [8, 16])
def test_identical_with_chunked_prefill(tiny, deterministic_reference, chunk):
    got = run_matrix(tiny, True, chunk, [1, 5, 16])
    for case, fp in got.items():
        assert fp == deterministic_reference["alone"], (chunk, case)


def test_without_the_flag_outputs_can_differ(tiny):
    """The default fast path makes no such promise: here some case differs."""
    got = run_matrix(tiny, False, 8, [1, 5, 16])
    assert len(set(got.values())) > 1, "the default path happened to be batch-invariant"


def test_moe_model_identical_across_batches_chunks_and_cache(embedded_tokenizer_dir, tmp_path):
    """A tiny Qwen3-MoE: the experts' matmuls are batch-invariant too (an
    expert's row count changes with everything else in the batch)."""
    path = build_moe_model("qwen3_moe", embedded_tokenizer_dir, tmp_path)
    cases = run_matrix(path, True, None, [1, 5, 16])
    cases.update({f"chunks of 8, {k}": v for k, v in run_matrix(path, True, 8, [3]).items()})
    reference = cases["alone"]
    for case, got in cases.items():
        assert got == reference, case


def test_default_model_identical_across_batches_chunks_and_cache():
    """The embedded SmolLM2-135M-Instruct: a few of the cases."""
    cases = run_matrix(None, True, None, [4])
    cases.update({f"chunks of 16, {k}": v for k, v in run_matrix(None, True, 16, [2]).items()})
    reference = cases["alone"]
    for case, got in cases.items():
        assert got == reference, case


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_fast_path_is_deterministic(tiny, dtype):
    """On CUDA: Triton attention with fixed decode splits, the fixed-tile Triton
    linear, CUDA graphs and the overlap schedule all on."""
    cases = run_matrix(tiny, True, None, [1, 3, 8, 16], dtype=dtype)
    cases.update({f"chunks of 8, {k}": v for k, v in run_matrix(tiny, True, 8, [5], dtype=dtype).items()})
    reference = cases["alone"]
    for case, got in cases.items():
        assert got == reference, case
