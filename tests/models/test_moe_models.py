"""Mixtral, Qwen2-MoE and Qwen3-MoE against transformers on the same tiny
random float32 weights: prefill logits, and greedy generations through the
Engine with chunked prefill, concurrent requests and radix-cache hits."""

from __future__ import annotations

import pytest
import torch

from radixserve import Engine
from radixserve.model_loader.weight_loader import get_weight
from tests.conftest import assert_no_leak, hf_greedy, load_hf_model
from tests.models.moe_tiny import build_moe_model, checkpoint_tensor

PROMPT_LENS = [5, 11, 19, 26, 33, 41]
NEW_TOKENS = 24
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe"])
def moe_setup(request, embedded_tokenizer_dir, tmp_path_factory):
    out = build_moe_model(request.param, embedded_tokenizer_dir, tmp_path_factory.mktemp(request.param))
    hf = load_hf_model(out)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, hf.config.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]
    expected = hf_greedy(hf, prompts, NEW_TOKENS)
    return request.param, out, hf, prompts, expected


def test_layer_kinds_follow_config(moe_setup):
    from radixserve.model_loader.loader import load_model
    from radixserve.model_loader.source import resolve_model_source
    from radixserve.models.sparse_moe import SparseMoeBlock
    from radixserve.utils.hf_utils import load_config

    family, path, hf, _, _ = moe_setup
    source = resolve_model_source(str(path))
    ours = load_model(source, load_config(source), torch.float32, torch.device("cpu"))
    sparse = [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.model.layers]
    theirs = ["Sparse" in type(layer.mlp).__name__ for layer in hf.model.layers]
    assert sparse == theirs
    expected = {"mixtral": [True] * 3, "qwen2_moe": [True, False, True], "qwen3_moe": [False, True, False]}
    assert sparse == expected[family]
    # Expert weights are served by their checkpoint names.
    layer = sparse.index(True)
    name = f"model.layers.{layer}.{'block_sparse_moe' if family == 'mixtral' else 'mlp'}.experts.1"
    name += ".w3.weight" if family == "mixtral" else ".up_proj.weight"
    assert torch.equal(get_weight(ours, name), checkpoint_tensor(path, name))


def test_prefill_logits_match(moe_setup):
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs
    from tests.models.prefill import prefill_all_logits

    _, path, hf, prompts, _ = moe_setup
    runner = ModelRunner(ServerArgs(model_path=str(path), device="cpu", max_total_tokens=4096))
    for ids, ours in zip(prompts, prefill_all_logits(runner, prompts)):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        rel = (ours - ref).norm() / ref.norm()
        assert rel < 1e-4, rel


def test_greedy_matches_generate_with_chunks_and_radix_hits(moe_setup):
    _, path, _, prompts, expected = moe_setup
    # page_size=1: short prompts must hit the radix cache (the CPU default page is 16)
    with Engine(model_path=str(path), chunked_prefill_size=16, max_total_tokens=2048, page_size=1) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == expected
        # Again: every prompt's prefix now comes from the radix cache.
        again = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in again] == expected
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
        assert_no_leak(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_path_matches_generate(moe_setup):
    """On CUDA: the Triton MoE kernel and attention, CUDA graphs and the overlap
    schedule, float32, give transformers' greedy tokens (computed on the CPU)."""
    _, path, _, prompts, expected = moe_setup
    with Engine(model_path=str(path), dtype="float32", chunked_prefill_size=16, log_level="warning") as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == expected
        assert_no_leak(engine)
