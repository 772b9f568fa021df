"""The CPU decode step's layers in one C++ call (cpu_decode_layers.py) against
the eager layers: the same forward batch both ways gives bit-identical logits
and writes the same K/V, step after step, ragged batches and weight updates
included; models and batches it does not take run eagerly."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers import cpu_kernels
from radixserve.layers.cpu_quantized_paths import AMX_INT4_DECODE_ROWS, DECODE_DENSE_FROM_ROWS
from radixserve.server_args import ServerArgs

pytestmark = pytest.mark.skipif(not cpu_kernels.quantized_kernels_available(),
                                reason="the fused layers run on a CPU with AMX or AVX-512 BF16")

# the first decode batch whose eager linears multiply by the dense copy, not a C++ kernel
DENSE_DECODE_ROWS = AMX_INT4_DECODE_ROWS.stop if cpu_kernels.amx_available() else DECODE_DENSE_FROM_ROWS


def int4_runner(path, max_running_requests: int = 64):
    from radixserve.model_executor.model_runner import ModelRunner

    return ModelRunner(ServerArgs(model_path=str(path), device="cpu", torchao_config="int4wo-32",
                                  max_total_tokens=4096, max_running_requests=max_running_requests))


def prefilled(runner, prompts, steps):
    from radixserve.bench_one_batch import make_batch

    batch, plans = make_batch(runner, prompts, steps + 4)
    batch.prepare_for_extend(plans)
    batch.last_token_ids = runner.forward(batch.to_forward_batch()).next_token_logits.argmax(dim=-1)
    return batch


def both_ways(runner, batch, capture=None):
    """One decode step eagerly, then the same forward batch through the fused
    layers: (eager logits, fused logits, eager K/V, fused K/V) of the step's
    slots. With `capture` (EAGLE-3's layers) the logits come with the captured
    layers' outputs concatenated after them."""
    fused = runner.cpu_decode_layers
    batch.prepare_for_decode()
    fb = batch.to_forward_batch()
    fb.capture_aux_layers = capture
    pool = runner.pools.kv_pool

    def kv():
        return [buf[fb.out_cache_loc].clone() for buf in pool.k_buffers + pool.v_buffers]

    def outputs(result):
        logits = result.next_token_logits.clone()
        return logits if capture is None else torch.cat([logits, result.aux_hidden.float()], dim=-1)

    runner.cpu_decode_layers = None
    eager = outputs(runner.forward(fb))
    eager_kv = kv()
    for buf in pool.k_buffers + pool.v_buffers:  # the fused step must write them itself
        buf[fb.out_cache_loc] = 0
    runner.cpu_decode_layers = fused
    assert fused.takes(fb)
    result = runner.forward(fb)
    batch.last_token_ids = result.next_token_logits.argmax(dim=-1)
    return eager, outputs(result), eager_kv, kv()


@pytest.mark.parametrize("batch_size,capture", [(1, None), (4, (0, 2)), (8, None), (13, (1,)),
                                                (DENSE_DECODE_ROWS - 1, None)])
def test_fused_layers_equal_the_eager_layers(tiny_model_factory, batch_size, capture):
    """Logits and K/V, and where an EAGLE-3 target asks for them (capture) the
    layers' outputs (the final-normed one is layer 2 of this 2-layer model)."""
    runner = int4_runner(tiny_model_factory("llama"))
    assert runner.cpu_decode_layers is not None
    gen = torch.Generator().manual_seed(batch_size)
    prompts = [torch.randint(10, 1000, (int(n),), generator=gen).tolist()
               for n in torch.randint(1, 90, (batch_size,), generator=gen)]
    batch = prefilled(runner, prompts, steps=6)
    for _ in range(6):
        eager, fused, eager_kv, fused_kv = both_ways(runner, batch, capture)
        assert torch.equal(eager, fused)
        assert all(torch.equal(a, b) for a, b in zip(eager_kv, fused_kv))


def test_weight_updates_reach_the_fused_layers(tiny_model_factory):
    runner = int4_runner(tiny_model_factory("llama"))
    batch = prefilled(runner, [[11 + i, 200, 300 + i] for i in range(8)], steps=3)
    before, _, _, _ = both_ways(runner, batch)
    name = "model.layers.1.mlp.down_proj.weight"
    shape = (runner.model.model.layers[1].mlp.down_proj.out_features,
             runner.model.model.layers[1].mlp.down_proj.in_features)
    gen = torch.Generator().manual_seed(3)
    norm = runner.model.model.layers[0].input_layernorm.weight
    runner.update_weights_from_tensor([(name, torch.randn(shape, generator=gen)),
                                       ("model.layers.0.input_layernorm.weight", 1 + torch.rand(norm.shape, generator=gen))])
    eager, fused, _, _ = both_ways(runner, batch)
    assert torch.equal(eager, fused)
    assert not torch.equal(eager, before)  # (a different step too, but the new weight shows in both)


def test_reads_and_released_memory_reach_the_fused_layers(tiny_model_factory):
    """A weight read re-quantizes (dropping the packed copies) and a resumed pool
    has new buffers: the fused layers' structs follow both."""
    runner = int4_runner(tiny_model_factory("llama"))
    batch = prefilled(runner, [[21 + i, 400, 500 + i] for i in range(9)], steps=4)
    both_ways(runner, batch)
    runner.get_weights_by_name("model.layers.0.self_attn.qkv_proj.weight", 4)
    eager, fused, eager_kv, fused_kv = both_ways(runner, batch)
    assert torch.equal(eager, fused) and all(torch.equal(a, b) for a, b in zip(eager_kv, fused_kv))
    runner.resume_memory_occupation(runner.release_memory_occupation())
    eager, fused, eager_kv, fused_kv = both_ways(runner, batch)
    assert torch.equal(eager, fused) and all(torch.equal(a, b) for a, b in zip(eager_kv, fused_kv))


def test_what_runs_eagerly(tiny_model_factory):
    from radixserve.model_executor.cpu_decode_layers import CpuDecodeLayers

    runner = int4_runner(tiny_model_factory("llama"), max_running_requests=DENSE_DECODE_ROWS)
    batch = prefilled(runner, [[5, 6, 7]] * DENSE_DECODE_ROWS, steps=2)
    batch.prepare_for_decode()
    fb = batch.to_forward_batch()
    fb.attn_backend = runner.attn_backend
    assert not runner.cpu_decode_layers.takes(fb)
    qwen3 = int4_runner(tiny_model_factory("qwen3"))  # q/k norms
    assert qwen3.cpu_decode_layers is None
    assert CpuDecodeLayers.for_model(runner.model, runner.device, torch.float32, None) is None


def verify_both_ways(runner, make_batch):
    """A verify-shaped extend eagerly, then through the fused layers: (eager
    output, fused output, eager K/V, fused K/V) of the new tokens' slots."""
    fused = runner.cpu_decode_layers
    pool = runner.pools.kv_pool
    fb = make_batch()

    def kv():
        return [buf[fb.out_cache_loc].clone() for buf in pool.k_buffers + pool.v_buffers]

    runner.cpu_decode_layers = None
    eager = runner.forward_eager(fb)
    eager_kv = kv()
    for buf in pool.k_buffers + pool.v_buffers:  # the fused forward must write them itself
        buf[fb.out_cache_loc] = 0
    runner.cpu_decode_layers = fused
    fb = make_batch()
    runner.attn_backend.init_forward_metadata(fb)
    fb.attn_backend = runner.attn_backend
    assert fused.takes(fb)
    return eager, runner.forward_eager(fb), eager_kv, kv()


@pytest.mark.parametrize("tree", [False, True])
def test_fused_layers_take_a_speculative_verify(tiny_model_factory, tree):
    """A verify (a few tokens a request over its cached prefix, each a decode
    query; a chain, or a draft tree with its mask) of at most 8 rows runs
    through the fused layers with the eager layers' bits: every position's
    logits, the K/V, and the EAGLE-3 layers' outputs the next draft reads."""
    from radixserve.speculative.tree import DraftTree
    from tests.model_executor.test_spec_graphs import Requests

    runner = int4_runner(tiny_model_factory("llama"))
    specs = [(9, 4), (14, 3)]  # 7 rows
    reqs = Requests(runner, specs)
    trees = [DraftTree([5, 6, 7], [-1, -1, 0]), DraftTree([9, 10], [-1, -1])]  # the last token and its drafts

    def verify():
        fb = reqs.new_tokens(every_logit=True)
        fb.capture_aux_layers = (0, 1, 2)  # both layers' outputs and the final-normed one
        if tree:
            fb.positions = torch.tensor([c + d for (c, _), t in zip(specs, trees) for d in t.row_depths()])
            fb.spec_tree_mask = torch.tensor([m for t in trees for m in t.row_masks()])
        return fb

    eager, fused, eager_kv, fused_kv = verify_both_ways(runner, verify)
    for name in ("next_token_logits", "all_logits", "aux_hidden"):
        assert torch.equal(getattr(eager, name), getattr(fused, name)), name
    assert all(torch.equal(a, b) for a, b in zip(eager_kv, fused_kv))


def test_an_extend_of_more_than_8_rows_runs_eagerly_unless_it_is_a_verify(tiny_model_factory):
    """From 9 rows the eager layers multiply an ordinary extend on torch's int4
    kernel, not the AMX one: the fused layers leave it to them (without AMX the
    AVX-512 BF16 kernel takes any extend below the dense copy's rows, and so do
    they). A verify runs as a decode step (as_decode_step), whose rows take the
    AMX kernel up to 64: the fused layers take it, with the eager layers' bits."""
    from tests.model_executor.test_spec_graphs import Requests

    runner = int4_runner(tiny_model_factory("llama"))
    reqs = Requests(runner, [(9, 4), (14, 4), (6, 1)])
    fb = reqs.new_tokens(every_logit=True)
    runner.attn_backend.init_forward_metadata(fb)
    fb.attn_backend = runner.attn_backend
    assert fb.attn_metadata.short_extend_rows is not None
    assert runner.cpu_decode_layers.takes(fb) == (not cpu_kernels.amx_available())

    def verify():
        fb = reqs.new_tokens(every_logit=True)
        fb.as_decode_step = True
        return fb

    eager, fused, eager_kv, fused_kv = verify_both_ways(runner, verify)
    assert torch.equal(eager.all_logits, fused.all_logits)
    assert all(torch.equal(a, b) for a, b in zip(eager_kv, fused_kv))


@pytest.mark.parametrize("new", [4, 8])
def test_a_verify_gives_each_row_the_logits_of_a_decode_step(tiny_model_factory, new):
    """Speculative greedy decoding gives plain greedy decoding's tokens only if
    a verify's row for a token has the logits a batch-1 decode step of that
    token has: the same bits, the int8 LM head included (on AMX or AVX-512 BF16
    from one row in both). Up to 8 rows, where the int4 kernel multiplies each row alone (past
    8 it dequantizes blocks for all rows, as a decode batch of 9 does)."""
    from radixserve.model_executor.forward_batch import ForwardMode
    from tests.model_executor.test_spec_graphs import Requests

    runner = int4_runner(tiny_model_factory("llama"))
    assert runner.weight_format.lm_head is not None  # the LM head is int8
    reqs = Requests(runner, [(9, new)])
    fb = reqs.new_tokens(every_logit=True)
    fb.as_decode_step = True
    verified = runner.forward(fb).all_logits
    steps = [runner.forward(reqs.batch([0], [9 + j], [1], mode=ForwardMode.DECODE)).next_token_logits
             for j in range(new)]
    assert torch.equal(verified, torch.cat(steps))
