"""Every family's tensor- and expert-parallel engine against transformers'
greedy tokens: tp=2 with ep=2 for the MoE families (Qwen3-MoE, DeepSeek-V3,
GPT-OSS; the dense attention paths are the same classes), through the whole
scheduler: chunked prefill of 16 tokens, a KV pool small enough to retract,
and a second pass over the same prompts that hits the radix cache.

The model-level comparison of every family's logits (and ep=1 splits) is in
tests/distributed/test_tp_models.py; this one shows the schedulers of both
ranks driving the split model the same way.

The reference is transformers' forward pass over the prompt and our output:
every token we chose must be its argmax at that position (teacher-forced
greedy). transformers' own generate() is not used here because its cached
decode for DeepSeek-V3 disagrees with its full forward pass on these weights
(on one prompt it picks a token whose logit is 0.19 below the top one).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from radixserve import Engine
from tests.distributed.tp_harness import family_configs, save_checkpoint
from tests.server_utils import free_port

DEVICE = os.environ.get("RADIXSERVE_TEST_DEVICE", "cpu")
PROMPT_LENS = [3, 9, 17, 26, 33, 41]
NEW_TOKENS = 24
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
FAMILIES = ["qwen3_moe", "deepseek_v3", "gpt_oss"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_tp2_ep2_greedy_with_chunks_retraction_and_radix_hits(family, tmp_path, embedded_tokenizer_dir):
    config = family_configs()[family]
    hf = save_checkpoint(config, tmp_path / family, gpt_oss=family == "gpt_oss")
    for f in os.listdir(embedded_tokenizer_dir):  # the engine detokenizes with it (ids < 1001 decode fine)
        shutil.copy(embedded_tokenizer_dir / f, tmp_path / family / f)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]
    with Engine(model_path=str(tmp_path / family), device=DEVICE, dtype="float32", tp_size=2, ep_size=2,
                dist_init_addr=f"127.0.0.1:{free_port()}", dist_timeout=120, chunked_prefill_size=16,
                max_total_tokens=112, schedule_conservativeness=0.05, log_level="warning") as engine:
        first = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        for prompt, out in zip(prompts, first):
            assert_transformers_greedy(hf, prompt, out["output_ids"])
        # Optimistic admission (conservativeness 0.05) into a pool smaller
        # than the batch needs: decode must retract, whatever the arrival order.
        assert engine.get_server_info()["num_retractions"] > 0
        again = engine.generate(input_ids=prompts[-2:], sampling_params=GREEDY)  # prefixes now cached
        assert [o["output_ids"] for o in again] == [o["output_ids"] for o in first[-2:]]
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in again), [o["meta_info"] for o in again]
        states = engine.get_server_info()["tp_ranks"]
        assert [s["tp_rank"] for s in states] == [0, 1]
        for s in states:  # nothing held, nothing leaked, and both ranks agree
            kv = s["kv_cache"]
            assert kv["in_use_tokens"] == 0 and kv == states[0]["kv_cache"], states
            assert kv["total_tokens"] == kv["free_tokens"] + kv["cached_tokens"], states


@torch.no_grad()
def assert_transformers_greedy(hf, prompt: list, output: list) -> None:
    """Each output token is transformers' argmax given the prompt and the
    output before it (a tie within 1e-5 may go either way)."""
    assert len(output) == NEW_TOKENS
    logits = hf(torch.tensor([prompt + output[:-1]])).logits[0, len(prompt) - 1:]
    best = logits.max(dim=-1).values
    chosen = logits[torch.arange(len(output)), torch.tensor(output)]
    assert torch.all(best - chosen <= 1e-5), (best - chosen).tolist()
