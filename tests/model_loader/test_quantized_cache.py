"""The quantized-weight cache (model_loader/quantized_cache.py): a model
filled from it is the model that was quantized, tensor for tensor, and a
second start of a GGUF model reads it."""

from __future__ import annotations

import pytest
import torch

from radixserve.model_loader.loader import build_model
from radixserve.model_loader.quantized_cache import cache_name, load_quantized, quantized_tensors, save_quantized
from radixserve.server_args import ServerArgs
from tests.models.deepseek_tiny import teacher_forced_logits


def runner_for(**kwargs):
    from radixserve.model_executor.model_runner import ModelRunner

    return ModelRunner(ServerArgs(device="cpu", max_total_tokens=256, **kwargs))


def test_round_trip_gives_the_same_tensors_and_logits(tiny_model_factory, tmp_path):
    runner = runner_for(model_path=str(tiny_model_factory("llama")), torchao_config="int4wo-32")
    path = tmp_path / "model.safetensors"
    save_quantized(runner.model, path)
    loaded = build_model(runner.config, runner.dtype, runner.device)
    load_quantized(loaded, path, runner.weight_format)
    want, got = quantized_tensors(runner.model), quantized_tensors(loaded)
    assert set(got) == set(want) and any(name.endswith("weight_scale") for name in got)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    prompts = [list(range(10, 40))]
    expected = teacher_forced_logits(runner, prompts, chunks=[30], decode_steps=0)
    runner.model = loaded
    assert torch.equal(teacher_forced_logits(runner, prompts, chunks=[30], decode_steps=0)[0], expected[0])


def test_a_file_of_another_model_is_refused(tiny_model_factory, tmp_path):
    llama = runner_for(model_path=str(tiny_model_factory("llama")), torchao_config="int4wo-32")
    qwen = runner_for(model_path=str(tiny_model_factory("qwen3")), torchao_config="int4wo-32")
    path = tmp_path / "model.safetensors"
    save_quantized(llama.model, path)
    with pytest.raises(ValueError, match="cached"):
        load_quantized(build_model(qwen.config, qwen.dtype, qwen.device), path, qwen.weight_format)


def test_second_start_of_the_default_model_reads_the_cache():
    from radixserve.layers.quantization import int4_weight_only
    from radixserve.model_loader.source import resolve_model_source
    from radixserve.utils.hf_utils import cache_dir

    # The packaged 4-bit GGUF serves as int4 in bfloat16 on the CPU; its cache is
    # removed first (the user's own: it is only a cache), so the first start writes it.
    source = resolve_model_source(ServerArgs().model_path)
    path = cache_dir(source.path, cache_name(int4_weight_only(32), torch.bfloat16)) / "model.safetensors"
    path.unlink(missing_ok=True)
    first = runner_for()
    assert first.weight_format.name == "int4wo-32" and path.is_file()
    written = path.stat().st_mtime_ns
    second = runner_for()
    assert path.stat().st_mtime_ns == written  # read, not rebuilt
    want, got = quantized_tensors(first.model), quantized_tensors(second.model)
    assert set(got) == set(want)
    assert all(torch.equal(got[name], want[name]) for name in want)
    # and the kernels run on them (they need aligned weights, which a plain load_file does not give)
    prompt = [list(range(100, 108))]
    expected = teacher_forced_logits(first, prompt, chunks=[8], decode_steps=0)[0]
    assert torch.equal(teacher_forced_logits(second, prompt, chunks=[8], decode_steps=0)[0], expected)
