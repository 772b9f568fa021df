"""DeepSeek-V2 and V3 (MLA, grouped MoE routing) against transformers on the
same tiny random float32 weights: prefill logits, extends on a cached prefix
and decode in both MLA forms on both attention backends, greedy generations
through the Engine, and the size of the latent KV cache."""

from __future__ import annotations

import os

import pytest
import torch

from radixserve import Engine
from radixserve.model_loader.weight_loader import get_weight, load_weights
from tests.conftest import assert_no_leak, hf_greedy, load_hf_model
from tests.models.deepseek_tiny import MLA_DIMS, build_deepseek, teacher_forced_logits
from tests.models.moe_tiny import checkpoint_tensor

FAMILIES = ["v2", "v3"]
PROMPT_LENS = [5, 19, 33, 41]
NEW_TOKENS = 16
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


@pytest.fixture(scope="module")
def deepseek_setups(embedded_tokenizer_dir, tmp_path_factory):
    """family -> (folder, transformers model, prompts); built on first use."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(embedded_tokenizer_dir))
    built = {}

    def get(family: str):
        if family not in built:
            path = tmp_path_factory.mktemp(f"deepseek_{family}")
            build_deepseek(family, vocab, path, embedded_tokenizer_dir)
            g = torch.Generator().manual_seed(1)
            prompts = [torch.randint(10, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]
            built[family] = (path, load_hf_model(path), prompts)
        return built[family]

    return get


def make_runner(path, backend: str, form: str = "auto", **kwargs):
    from radixserve.layers.attention.mla import MLAAttention
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs

    kwargs.setdefault("max_total_tokens", 2048)
    kwargs.setdefault("device", "cpu")
    runner = ModelRunner(ServerArgs(model_path=str(path), attention_backend=backend, **kwargs))
    for module in runner.model.modules():
        if isinstance(module, MLAAttention):
            module.form = form
    return runner


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


@torch.no_grad()
def hf_logits(hf, ids) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_and_weights_follow_the_checkpoint(family, deepseek_setups):
    from radixserve.model_loader.hf_weights import HFWeights
    from radixserve.models.deepseek_v2 import DeepseekMoE

    path, hf, _ = deepseek_setups(family)
    model = make_runner(path, "torch_native").model
    moe = [isinstance(layer.mlp, DeepseekMoE) for layer in model.model.layers]
    assert moe == ([True, True] if family == "v2" else [False, True, True])
    attn = model.model.layers[1].self_attn
    assert attn.q_is_low_rank == (family == "v3")
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    if family == "v3":
        stored = checkpoint_tensor(path, "model.layers.1.mlp.gate.e_score_correction_bias")
        assert stored.abs().min() > 0 and torch.equal(bias, stored)
    else:
        assert bias is None
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    assert torch.equal(get_weight(model, name), checkpoint_tensor(path, name))
    # V3 checkpoints carry multi-token-prediction layers after the last one: skipped.
    extra = (f"model.layers.{len(moe)}.eh_proj.weight", torch.zeros(2, 2))
    load_weights(model, list(HFWeights(path)) + [extra])
    with pytest.raises(ValueError, match="unexpected weight"):
        load_weights(model, [("model.layers.0.eh_proj.weight", torch.zeros(2, 2))], strict=False)


@pytest.mark.parametrize("form", ["absorbed", "expanded", "auto"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_transformers(family, form, deepseek_setups):
    """One batch of fresh prefills through the scheduler's own batch and runner."""
    from tests.models.prefill import prefill_all_logits

    path, hf, prompts = deepseek_setups(family)
    runner = make_runner(path, "torch_native", form)
    for ids, ours in zip(prompts, prefill_all_logits(runner, prompts)):
        assert rel_err(ours, hf_logits(hf, ids)) < 1e-4


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
@pytest.mark.parametrize("form", ["absorbed", "expanded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_extend_on_prefix_and_decode_match_transformers(family, form, backend, deepseek_setups):
    """Chunks of 7 then 12 new tokens (the second on top of the first's cache),
    then decode steps, two requests batched: every position's logits. Both forms
    must agree with transformers, hence with each other."""
    path, hf, prompts = deepseek_setups(family)
    runner = make_runner(path, backend, form)
    sequences = [prompts[1] + prompts[0][:3], prompts[2][:22]]  # 22 and 22 tokens
    ours = teacher_forced_logits(runner, sequences, chunks=[7, 12], decode_steps=3)
    for ids, logits in zip(sequences, ours):
        assert rel_err(logits, hf_logits(hf, ids)) < 1e-4
    assert runner.allocator.available_size() == runner.allocator.total_tokens  # all slots back


def test_auto_form_follows_cost(deepseek_setups):
    """Fresh prefills expand; a short extend on a long cached prefix stays
    absorbed; a long one on the same prefix expands the prefix too."""
    from types import SimpleNamespace

    from radixserve.layers.attention.mla import MLAAttention, prefers_expanded
    from radixserve.model_executor.forward_batch import ForwardMode

    layer = MLAAttention(128, 128, 64, 128, 512, 0.1, 0)  # DeepSeek-V3's dims

    def batch(prefixes, extends, mode=ForwardMode.EXTEND):
        return SimpleNamespace(forward_mode=mode, extend_prefix_lens_cpu=prefixes, extend_seq_lens_cpu=extends)

    assert prefers_expanded(layer, batch([0, 0], [1, 300]))
    assert not prefers_expanded(layer, batch([4000], [8]))
    assert prefers_expanded(layer, batch([4000], [2000]))
    assert not prefers_expanded(layer, batch(None, None, ForwardMode.DECODE))
    layer.form = "absorbed"
    assert not prefers_expanded(layer, batch([0], [300]))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_generate_with_chunks_and_radix_hits(family, deepseek_setups):
    """Concurrent requests, chunks of 16 tokens (later chunks extend a cached
    prefix: the auto form mixes both), then every prompt again from the radix
    cache; V3 with pages of 4 tokens."""
    path, hf, prompts = deepseek_setups(family)
    expected = hf_greedy(hf, prompts, NEW_TOKENS)
    with Engine(model_path=str(path), chunked_prefill_size=16, max_total_tokens=2048,
                page_size=4 if family == "v3" else 1, attention_backend="torch_native",
                log_level="warning") as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == expected
        again = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in again] == expected
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
        assert_no_leak(engine)


def test_kv_pool_holds_latent_and_rope_key_only(deepseek_setups):
    """Per token and layer the cache holds kv_lora_rank + rope values, and the
    token count for a memory budget is that budget over this size."""
    from radixserve.mem_cache.mla_pool import MLAKVPool

    path, _, _ = deepseek_setups("v3")
    weights_probe = make_runner(path, "torch_native", max_total_tokens=64).model
    weight_bytes = sum(p.numel() * p.element_size() for p in weights_probe.parameters())
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    kv_budget = 1 << 20
    runner = make_runner(path, "torch_native", max_total_tokens=None,
                         mem_fraction_static=(weight_bytes + kv_budget) / total)
    width = MLA_DIMS["kv_lora_rank"] + MLA_DIMS["qk_rope_head_dim"]
    per_token = 3 * width * 4  # 3 layers, float32
    assert runner.kv_bytes_per_token == per_token
    # The pool is whole pages; the float rounding of the fraction may move the budget by a byte or so.
    page = runner.server_args.resolved_page_size()
    assert runner.max_total_num_tokens % page == 0
    assert abs(runner.max_total_num_tokens - kv_budget // per_token) < page + 1
    pool = runner.pools.kv_pool
    assert isinstance(pool, MLAKVPool)
    assert [tuple(b.shape) for b in pool.latent_buffers] == [(runner.allocator.num_slots, 1, width)] * 3
    assert sum(b.numel() * b.element_size() for b in pool.latent_buffers) == runner.allocator.num_slots * per_token


def test_triton_backend_through_the_engine(deepseek_setups):
    """The Triton MLA kernels (interpreted on the CPU) in the serving loop:
    batched decode with split KV, and extends on a radix hit."""
    path, hf, prompts = deepseek_setups("v3")
    prompts = prompts[:2]
    new = 4
    expected = hf_greedy(hf, prompts, new)
    params = {**GREEDY, "max_new_tokens": new}
    with Engine(model_path=str(path), attention_backend="triton", max_total_tokens=512, page_size=1,
                log_level="warning") as engine:  # page_size=1: the short prompts hit the radix cache
        assert [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)] == expected
        longer = [p + [7] for p in prompts]
        again = engine.generate(input_ids=longer, sampling_params={**params, "max_new_tokens": 1})
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
        assert [o["output_ids"] for o in again] == [[int(hf_logits(hf, ids)[-1].argmax())] for ids in longer]
        assert_no_leak(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_fast_path_matches_generate(family, deepseek_setups):
    """On CUDA, float32: the Triton MLA kernels, the fused MoE kernel, decode
    CUDA graphs and the overlap schedule give transformers' greedy tokens
    (computed on the CPU), with chunks and radix hits."""
    path, hf, prompts = deepseek_setups(family)
    expected = hf_greedy(hf, prompts, NEW_TOKENS)
    with Engine(model_path=str(path), dtype="float32", chunked_prefill_size=16, log_level="warning") as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == expected
        again = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in again] == expected
        # One request at a time: batch-1 steps, the shared experts as slots of the experts' kernels
        alone = [engine.generate(input_ids=[p], sampling_params=GREEDY)[0]["output_ids"] for p in prompts[:2]]
        assert alone == expected[:2]
        assert_no_leak(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_experts_as_slots_match_the_shared_mlp(family, deepseek_setups, monkeypatch):
    """At one token on CUDA the shared experts run as extra slots of the
    routed experts' kernels; the layer's output is the one with the shared
    MLP run on its own (float32: 1e-5), and at two tokens no slots are used."""
    from radixserve.layers.moe.layer import FusedMoE
    from radixserve.models.deepseek_v2 import DeepseekMoE

    path, _, _ = deepseek_setups(family)
    model = make_runner(path, "triton", device="cuda", dtype="float32").model
    moe = next(m for m in model.modules() if isinstance(m, DeepseekMoE))
    shared = moe.shared_experts
    one = torch.randn(1, moe.experts.w13.shape[2], device="cuda")
    assert moe.experts.shared_slots(one, shared.gate_up_proj, shared.down_proj) is not None
    assert moe.experts.shared_slots(one.expand(2, -1), shared.gate_up_proj, shared.down_proj) is None
    with torch.no_grad():
        as_slots = moe(one)
        monkeypatch.setattr(FusedMoE, "shared_slots", lambda *args: None)
        apart = moe(one)
    assert rel_err(as_slots, apart) < 1e-5 and apart.norm() > 0
