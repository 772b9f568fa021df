"""An EAGLE-3 head's layer in one C++ call (cpu_eagle3_layer.py) against the
eager head: a catch-up extend (a few tokens a request over its earlier
entries) and draft decode steps give bit-identical logits and hidden states
and write the same K/V; a new request's first extend runs eagerly."""

from __future__ import annotations

import pytest
import torch

from radixserve.layers import cpu_kernels
from radixserve.model_executor.cpu_eagle3_layer import CpuEagle3Layer
from radixserve.model_executor.forward_batch import ForwardMode
from radixserve.server_args import ServerArgs
from tests.model_executor.test_spec_graphs import Requests

pytestmark = pytest.mark.skipif(not cpu_kernels.quantized_kernels_available(),
                                reason="the fused layer runs on a CPU with AMX or AVX-512 BF16")


def head_runner(target_path, out, dtype: str = "bfloat16"):
    """A random EAGLE-3 head for the tiny target, run as the draft runner runs
    one on the CPU (int8 linears), reading the target's embedding."""
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.train_eagle3 import head_config, init_head, save_head

    target = ModelRunner(ServerArgs(model_path=str(target_path), device="cpu", max_total_tokens=256,
                                    max_running_requests=4), warm_up=False)
    config = head_config(target.config, 64, [0, 1, 1])
    save_head(init_head(config, target, torch.arange(64), "cpu"), config, out, torch.bfloat16)
    head = ModelRunner(ServerArgs(model_path=str(out), device="cpu", dtype=dtype, torchao_config="int8wo",
                                  max_total_tokens=1024, max_running_requests=8), warm_up=False)
    head.model.attach_target(target.model)
    return head


def with_metadata(runner, fb):
    """fb with its attention metadata, which takes() reads (forward sets it again)."""
    fb.attn_backend = runner.attn_backend
    runner.attn_backend.init_forward_metadata(fb)
    return fb


def both_ways(runner, make_batch):
    """The batch eagerly, then through the fused layer, each writing its K/V:
    (eager output, fused output, eager K/V, fused K/V) of the batch's slots."""
    fused = runner.cpu_decode_layers
    pool = runner.pools.kv_pool

    def kv(fb):
        return [buf[fb.out_cache_loc].clone() for buf in pool.k_buffers + pool.v_buffers]

    runner.cpu_decode_layers = None
    fb = make_batch()
    eager = runner.forward(fb)
    eager_kv = kv(fb)
    for buf in pool.k_buffers + pool.v_buffers:  # the fused call must write them itself
        buf[fb.out_cache_loc] = 0
    runner.cpu_decode_layers = fused
    fb = with_metadata(runner, make_batch())
    assert fused.takes(fb)
    return eager, runner.forward(fb), eager_kv, kv(fb)


def test_fused_layer_equals_the_eager_head(tiny_model_factory, tmp_path):
    runner = head_runner(tiny_model_factory("llama"), tmp_path)
    assert isinstance(runner.cpu_decode_layers, CpuEagle3Layer)
    hidden = runner.model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    reqs = Requests(runner, [(0, 12), (0, 7), (0, 10)], spare=4)
    prompt = reqs.batch([0, 1, 2], [0, 0, 0], [6, 3, 5])
    prompt.spec_hidden, prompt.as_decode_step = torch.randn(14, 3 * hidden, generator=g).bfloat16(), True
    assert not runner.cpu_decode_layers.takes(with_metadata(runner, prompt))  # no earlier entries: a prompt, eagerly
    runner.forward(prompt)
    catch_up_features = torch.randn(6, 3 * hidden, generator=g).bfloat16()

    def catch_up():  # the target's features of a verify's accepted tokens
        fb = reqs.batch([0, 1, 2], [6, 3, 5], [3, 1, 2])
        fb.spec_hidden, fb.return_hidden, fb.as_decode_step = catch_up_features, True, True
        return fb

    step_hidden = torch.randn(3, hidden, generator=g).bfloat16()

    def draft_step():  # a later draft step: the previous step's output fed back
        fb = reqs.batch([0, 1, 2], [9, 4, 7], [1, 1, 1], mode=ForwardMode.DECODE)
        fb.spec_hidden, fb.return_hidden = step_hidden, True
        return fb

    for make_batch in (catch_up, draft_step):
        eager, fused, eager_kv, fused_kv = both_ways(runner, make_batch)
        assert torch.equal(eager.next_token_logits, fused.next_token_logits)
        assert torch.equal(eager.hidden, fused.hidden)
        assert all(torch.equal(a, b) for a, b in zip(eager_kv, fused_kv))
        assert eager_kv[0].abs().sum() > 0


def test_what_runs_eagerly(tiny_model_factory, tmp_path):
    runner = head_runner(tiny_model_factory("llama"), tmp_path, dtype="float32")
    assert runner.cpu_decode_layers is None  # float32 activations: not the int8 kernel's bfloat16 rows
    assert CpuEagle3Layer.for_model(runner.model, torch.device("cpu"), torch.bfloat16, object()) is None  # LoRA
