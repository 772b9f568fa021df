"""The start-up kernel warm-up (model_executor/kernel_warmup.py): its shapes
reach every kernel variant a forward can select, and its forwards leave the
pools and the model's answers as they were. (The GPU test that nothing
compiles while serving is in tests/e2e/test_gpu_paths.py.)"""

from __future__ import annotations

import pytest
import torch

from radixserve.layers.moe.fused_moe_triton import moe_kernel_config
from radixserve.layers.triton_utils import dot_block
from radixserve.model_executor.forward_batch import ForwardMode
from radixserve.model_executor.kernel_warmup import warm_up_kernels, warmup_shapes
from radixserve.server_args import ServerArgs
from tests.models.deepseek_tiny import build_deepseek, teacher_forced_logits


def moe_variant(num_tokens: int, top_k: int, dtype: torch.dtype) -> tuple:
    """What the fused MoE kernels compile per batch: the tile configuration and
    the alignment kernel's chunk (fused_moe_triton.py)."""
    return moe_kernel_config(num_tokens, dtype), min(1024, dot_block(num_tokens * top_k))


@pytest.mark.parametrize("max_tokens", [8192, 2048, 3000, 100])
@pytest.mark.parametrize("top_k", [1, 2, 6, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shapes_reach_every_moe_variant(max_tokens, top_k, dtype):
    shapes = warmup_shapes(max_tokens, max_decode=64, context_len=4096, mixed=True)
    warmed = {moe_variant(s.num_decode + s.num_new, top_k, dtype) for s in shapes}
    reachable = {moe_variant(n, top_k, dtype) for n in range(1, max_tokens + 64 + 1)}
    assert reachable <= warmed


def test_prefills_longer_than_the_context_are_split_over_requests():
    for shape in warmup_shapes(3000, max_decode=4, context_len=512, mixed=False):
        reqs = shape.requests()
        assert all(cached + new <= 512 for cached, new in reqs)
        assert sum(new for _, new in reqs) == shape.num_new + shape.num_decode


def test_shapes_reach_every_decode_split_count_and_mixed_parity():
    from radixserve.layers.triton_utils import decode_split_count

    shapes = warmup_shapes(512, max_decode=300, context_len=4096, mixed=True)
    decode_sizes = {s.num_decode for s in shapes if s.mode == ForwardMode.DECODE}
    for sms in (132, 16):
        for kv_heads in (1, 8):
            warmed = {decode_split_count(n * kv_heads, sms) for n in decode_sizes}
            assert {decode_split_count(n * kv_heads, sms) for n in range(1, 301)} <= warmed
    mixed = {s.num_decode % 2 for s in shapes if s.mode == ForwardMode.MIXED}
    assert mixed == {0, 1}  # the extend half starts at an odd and at an even row
    assert any(s.prefix_len > 0 for s in shapes if s.mode == ForwardMode.EXTEND)


@pytest.mark.parametrize("arch", ["llama", "deepseek_v2"])
def test_warm_up_gives_back_every_slot_and_changes_no_answer(arch, tiny_model_factory, tmp_path):
    from radixserve.model_executor.model_runner import ModelRunner

    if arch == "llama":
        path = tiny_model_factory("llama")
    else:
        path = tmp_path / "ds"
        build_deepseek("v2", 1000, path)
    runner = ModelRunner(ServerArgs(model_path=str(path), device="cpu", max_total_tokens=2048, page_size=4,
                                    chunked_prefill_size=256, max_running_requests=8, enable_mixed_chunk=True))
    pools = runner.pools
    free_slots, free_rows = pools.allocator.available_size(), pools.req_to_token_pool.available_size()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (9, 40)]
    before = teacher_forced_logits(runner, prompts, chunks=[16, 64], decode_steps=0)
    ran = warm_up_kernels(runner)
    # prefills of 1..256 and 264 (chunk + 8 decode rows), two on a prefix, decodes of 1..8, mixed 1..8
    assert ran == 10 + 2 + 4 + 4
    assert pools.allocator.available_size() == free_slots
    assert pools.req_to_token_pool.available_size() == free_rows
    after = teacher_forced_logits(runner, prompts, chunks=[16, 64], decode_steps=0)
    for b, a in zip(before, after):
        assert torch.equal(a, b)


def test_ngram_trees_warm_up_the_tree_extend(tiny_model_factory):
    """With NGRAM draft trees the plan adds one extend with tree masks (the
    Triton extend kernel's tree variant), which runs and gives its slots back."""
    from types import SimpleNamespace

    from radixserve.model_executor.kernel_warmup import run_warmup_forward, warmup_plan
    from radixserve.model_executor.model_runner import ModelRunner

    def plan(**spec):
        args = ServerArgs(chunked_prefill_size=64, **spec)
        runner = SimpleNamespace(server_args=args, max_total_num_tokens=4096, max_running_requests=4,
                                 context_len=512, pooling=None)
        return [s for s in warmup_plan(runner) if s.tree]

    assert len(plan(speculative_algorithm="NGRAM")) == 1
    assert plan(speculative_algorithm="NGRAM", speculative_ngram_max_bfs_breadth=1) == [] == plan()
    runner = ModelRunner(ServerArgs(model_path=str(tiny_model_factory("llama")), device="cpu", dtype="float32",
                                    attention_backend="triton", max_total_tokens=256, max_running_requests=4,
                                    speculative_algorithm="NGRAM"), warm_up=False)
    free = runner.pools.allocator.available_size()
    assert run_warmup_forward(runner, plan(speculative_algorithm="NGRAM")[0])
    assert runner.pools.allocator.available_size() == free


def test_cpu_start_up_makes_the_quantized_weights_copies():
    """The packaged default model (4-bit GGUF weights) leaves start-up with
    each quantized linear's dense copy for prefills and, on a CPU with AMX or
    AVX-512 BF16, its packed copy for decode steps: neither is made inside a
    first request."""
    from radixserve.layers import cpu_kernels
    from radixserve.model_executor.model_runner import ModelRunner

    runner = ModelRunner(ServerArgs(model_path=None, device="cpu"))
    layers = runner.model.model.layers
    linears = [layers[0].self_attn.qkv_proj, layers[0].mlp.down_proj, layers[-1].mlp.gate_up_proj]
    for linear in linears:
        copies = linear.weight.__dict__
        assert "dense_copy" in copies
        assert ("amx_copy" in copies) == cpu_kernels.quantized_kernels_available()
    # and its decode batches' layers run in one C++ call there (cpu_decode_layers.py)
    assert (runner.cpu_decode_layers is not None) == cpu_kernels.quantized_kernels_available()
