"""int4 weight-only (--torchao-config int4wo-G, --quantization gguf): the
packed layout against torch's own packer, the linear against the dequantized
product, a GGUF Q4_1 file's blocks recovered, the update round trip, a tiny
Llama against transformers with the same int4 weights, and the default model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from radixserve.layers import cpu_kernels, cpu_quantized_paths
from radixserve.layers.cpu_quantized_paths import INT8_DEQUANTIZE_FROM_ROWS
from radixserve.layers.linear import Linear, MergedLinear
from radixserve.layers.quantization import (
    int4_dequantized, int4_weight_only, int4_weight_only_linear, quantize_int4_groups,
    quantize_linears, quantize_per_row, unpack_int4, unquantized,
)
from radixserve.server_args import ServerArgs
from tests.conftest import load_hf_model
from tests.models.deepseek_tiny import teacher_forced_logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_unpack_reads_torchs_packed_layout():
    q = torch.randint(0, 16, (192, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_int4(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)), q.to(torch.uint8))


@pytest.mark.parametrize("group", [32, 64])
def test_quantizer_maps_each_groups_range_onto_0_to_15(group):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) * torch.logspace(-2, 1, 64)[:, None]
    packed, scales_and_zeros = quantize_int4_groups(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (64, 128)
    assert scales_and_zeros.shape == (256 // group, 64, 2) and scales_and_zeros.dtype == torch.bfloat16
    q = unpack_int4(packed).view(64, -1, group)
    assert (q.amin(-1) == 0).all() and (q.amax(-1) == 15).all()
    scale = scales_and_zeros[..., 0].t().float()[..., None]  # [out, groups, 1]
    err = (int4_dequantized(packed, scales_and_zeros) - w).view(64, -1, group).abs()
    assert (err <= 0.51 * scale * (1 + 2 ** -7) + 1e-6).all()  # half a step, plus bf16's rounding of the step


@pytest.mark.parametrize("rows", [3, INT8_DEQUANTIZE_FROM_ROWS + 5])  # the int4 kernel; a prefill's GEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_equals_the_dequantized_product(rows, dtype):
    g = torch.Generator().manual_seed(2)
    w, x, bias = torch.randn(128, 96, generator=g), torch.randn(rows, 96, generator=g), torch.randn(128, generator=g)
    packed, scales_and_zeros = quantize_int4_groups(w, 32)
    out = int4_weight_only_linear(x.to(dtype), packed, scales_and_zeros, bias.to(dtype))
    reference = x @ int4_dequantized(packed, scales_and_zeros).T + bias
    assert out.dtype == dtype and out.shape == (rows, 128)
    assert rel(out, reference) < 1e-2  # bfloat16 activations inside
    assert rel(out, x @ w.T + bias) > 2e-2  # and it is the int4 weight, not the original


def test_q4_1_blocks_are_recovered():
    """GGUF's Q4_1 stores w = d * q + m per block of 32 (d, m float16; the
    block's min at q = 0, max at q = 15): our groups of 32 hold the same q."""
    g = torch.Generator().manual_seed(3)
    d = (torch.rand(64, 6, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (-8 * d * (1 + 0.1 * torch.randn(64, 6, 1, generator=g))).half().float()  # blocks roughly centred
    q = torch.randint(0, 16, (64, 6, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    w = (d * q + m).view(64, 192)
    packed, scales_and_zeros = quantize_int4_groups(w.bfloat16(), 32)  # as loaded with --dtype auto
    assert torch.equal(unpack_int4(packed).view(64, 6, 32), q.to(torch.uint8))
    assert rel(int4_dequantized(packed, scales_and_zeros), w) < 5e-3  # d and m rounded to bfloat16


def test_embedded_gguf_keeps_its_4bit_values():
    """The packaged model's Q4_1 projections, against the gguf library's own dequantization."""
    from radixserve.model_loader.gguf_weights import iterate_gguf_weights
    from radixserve.model_loader.source import resolve_model_source

    source = resolve_model_source("SmolLM2-135M-Instruct")
    checked = 0
    for name, w in iterate_gguf_weights(source.path):
        if not name.startswith("model.layers.0."):
            continue
        if w.dim() == 2:
            from_bf16 = quantize_int4_groups(w.bfloat16(), 32)
            assert torch.equal(unpack_int4(from_bf16[0]), unpack_int4(quantize_int4_groups(w, 32)[0])), name
            assert rel(int4_dequantized(*from_bf16), w) < 6e-3, name
            checked += 1
    assert checked == 7  # q, k, v, o, gate, up, down


def test_update_round_trip_keeps_untouched_rows():
    torch.manual_seed(4)
    block = nn.Module()
    block.qkv_proj = MergedLinear(64, {"q": 64, "k": 32, "v": 32})
    nn.init.normal_(block.qkv_proj.weight)
    assert quantize_linears(block, int4_weight_only(32)) == 1
    weight, scales = block.qkv_proj.weight, block.qkv_proj.weight_scale
    before = int4_dequantized(weight.data, scales)
    before_packed, before_scales = weight.data.clone(), scales.clone()
    new_k = torch.randn(32, 64)
    with unquantized(block):
        assert torch.equal(block.qkv_proj.weight, before)
        block.qkv_proj.load_shard("k", "weight", new_k)
    after = int4_dequantized(weight.data, scales)
    assert block.qkv_proj.weight is weight and block.qkv_proj.weight_scale is scales  # same tensors
    untouched = torch.cat([torch.arange(0, 64), torch.arange(96, 128)])
    assert torch.equal(after[untouched], before[untouched])
    assert rel(after[64:96], new_k) < 0.1 and not torch.equal(weight.data, before_packed)
    assert not torch.equal(scales, before_scales)
    packed_now, scales_now = weight.data.clone(), scales.clone()
    with unquantized(block):
        pass  # nothing changed: everything comes back bit for bit
    assert torch.equal(weight.data, packed_now) and torch.equal(scales, scales_now)


def int4_round_trip(w: torch.Tensor) -> torch.Tensor:
    """w's values as int4 in groups of 32. Groups lie within a row, so a
    projection alone (k_proj: 32 rows, fewer than the packer's 64) is padded
    with zero rows and gets the values it has inside our merged q|k|v."""
    rows = w.shape[0]
    padded = torch.cat([w, w.new_zeros(-rows % 64, w.shape[1])])
    return int4_dequantized(*quantize_int4_groups(padded, 32))[:rows]


def test_tiny_llama_matches_transformers_with_the_same_int4_weights(tiny_model_factory):
    from radixserve.model_executor.model_runner import ModelRunner

    path = tiny_model_factory("llama")
    prompts = [torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(5)).tolist() for n in (6, 30)]
    runner = ModelRunner(ServerArgs(model_path=str(path), device="cpu", torchao_config="int4wo-32",
                                    max_total_tokens=512))
    assert runner.dtype == torch.bfloat16 and runner.model.lm_head.qweight.dtype == torch.int8
    ours = teacher_forced_logits(runner, prompts, chunks=[16, 16], decode_steps=0)
    hf = load_hf_model(path)
    with torch.no_grad():
        exact = [hf(torch.tensor([p])).logits[0] for p in prompts]
        for name, module in hf.named_modules():
            if name.endswith("lm_head"):
                q, scale = quantize_per_row(module.weight.data, torch.int8)
                module.weight.data = q.float() * scale
            elif isinstance(module, nn.Linear):
                module.weight.data = int4_round_trip(module.weight.data.bfloat16())
        reference = [hf(torch.tensor([p])).logits[0] for p in prompts]
    for o, r, e in zip(ours, reference, exact):
        assert rel(o, r) < 2e-2 and rel(o, e) > 3 * rel(o, r)  # bfloat16 activations vs the int4 weights' error


def test_flags_are_checked(tiny_model_factory):
    from radixserve.model_executor.model_runner import ModelRunner

    with pytest.raises(ValueError, match="torchao_config"):
        ServerArgs(torchao_config="int4wo-7", device="cpu")
    with pytest.raises(ValueError, match="CPU only"):
        ServerArgs(quantization="gguf", device="cuda")
    with pytest.raises(ValueError, match="quantization=gguf needs a .gguf model"):
        ModelRunner(ServerArgs(model_path=str(tiny_model_factory("llama")), device="cpu", quantization="gguf"))


def test_default_model_answers_with_its_gguf_weights():
    from radixserve import Engine

    with Engine(quantization="gguf", log_level="warning") as engine:
        info = engine.get_server_info()
        assert info["dtype"] == "bfloat16" and info["weight_format"] == "int4wo-32"
        out = engine.generate(prompt="The capital of France is", sampling_params={"temperature": 0,
                                                                                 "max_new_tokens": 4})
    assert "Paris" in out["text"]


@pytest.mark.parametrize("flags, device, expected", [
    ({}, "cpu", "int4wo-32"),  # the default for a 4-bit GGUF on the CPU
    ({"dtype": "float32"}, "cpu", None),  # an explicit dtype keeps the dequantized weights
    ({"enable_deterministic_inference": True}, "cpu", None),
    ({}, "cuda", None),
    ({"quantization": "gguf"}, "cpu", "int4wo-32"),
    ({"torchao_config": "int8wo"}, "cpu", "int8wo"),
])
def test_default_weight_format_for_a_4bit_gguf(flags, device, expected):
    from types import SimpleNamespace

    from radixserve.model_executor.model_runner import resolve_weight_format

    args = ServerArgs(device="cpu", **flags)
    fmt = resolve_weight_format(args, "gguf", SimpleNamespace(gguf_block_types=["Q4_1"]), device)
    assert (fmt.name if fmt else None) == expected


def test_other_ggufs_keep_their_dtype_by_default_and_gguf_makes_them_int8():
    from types import SimpleNamespace

    from radixserve.model_executor.model_runner import resolve_weight_format

    q8 = SimpleNamespace(gguf_block_types=["Q8_0"])
    assert resolve_weight_format(ServerArgs(device="cpu"), "gguf", q8, "cpu") is None
    assert resolve_weight_format(ServerArgs(device="cpu", quantization="gguf"), "gguf", q8, "cpu").name == "int8wo"
    hf = SimpleNamespace()  # a checkpoint folder's config: no GGUF block types
    assert resolve_weight_format(ServerArgs(device="cpu"), "hf", hf, "cpu") is None


def test_the_packaged_models_config_names_its_block_types():
    from radixserve.model_loader.source import resolve_model_source
    from radixserve.utils.hf_utils import load_config

    assert load_config(resolve_model_source("SmolLM2-135M-Instruct")).gguf_block_types == ["Q4_1"]


@pytest.mark.parametrize("gemm_dtype", [torch.bfloat16, torch.float32])
def test_prefill_gemm_runs_in_the_chosen_dtype(monkeypatch, gemm_dtype):
    """A prefill's dequantized GEMM: bfloat16 where the CPU has bfloat16 units,
    float32 elsewhere (the module decides once); either way the output keeps
    the activations' dtype and equals that dtype's own product. A bfloat16
    copy is kept in oneDNN's packed layout where the CPU has bfloat16 units."""

    monkeypatch.setattr(cpu_quantized_paths, "PREFILL_GEMM_DTYPE", gemm_dtype)
    g = torch.Generator().manual_seed(5)
    rows, weight = torch.randn(200, 96, generator=g).to(torch.bfloat16), torch.randn(64, 96, generator=g)
    quantized = torch.zeros(64, 48, dtype=torch.uint8)  # stands for the packed weight the copy is kept on
    out = cpu_quantized_paths.prefill_gemm(rows, quantized, lambda: weight)
    want = torch.nn.functional.linear(rows.to(gemm_dtype), weight.to(gemm_dtype)).to(torch.bfloat16)
    packed = bool(quantized.dense_copy.__dict__.get("onednn_packed"))
    assert packed == (gemm_dtype == torch.bfloat16 and cpu_quantized_paths.ONEDNN_PACKED_BF16)
    assert out.dtype == torch.bfloat16
    # (the packed product gave the same bits on an AMX Xeon; oneDNN may sum in another order elsewhere)
    assert torch.equal(out, want) if not packed else rel(out, want) < 2e-3
    if packed:  # the next call reuses the packed copy
        assert torch.equal(cpu_quantized_paths.prefill_gemm(rows, quantized, lambda: 1 / 0), out)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_decode_batches_take_the_dense_copy_only_with_native_bf16(monkeypatch, native_bf16):
    """In a decode step (cpu_quantized_paths.decode_step) DECODE_DENSE_FROM_ROWS
    (20) or more bfloat16 rows go through the dense copy where the CPU
    multiplies bfloat16 in hardware, one row fewer never; outside one (a
    short prefill) the int4 kernel takes any row count below a prefill's 128."""
    monkeypatch.setattr(cpu_quantized_paths, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)  # the AMX int4 kernel: its own test below
    torch.manual_seed(7)
    linear = Linear(64, 64)
    nn.init.normal_(linear.weight)
    quantize_linears(linear, int4_weight_only(32))
    x = torch.randn(cpu_quantized_paths.DECODE_DENSE_FROM_ROWS, 64).to(torch.bfloat16)
    kernel = linear(x)
    assert "dense_copy" not in linear.weight.__dict__
    with cpu_quantized_paths.decode_step():
        linear(x[:-1])
        assert "dense_copy" not in linear.weight.__dict__
        decode = linear(x)
    assert ("dense_copy" in linear.weight.__dict__) == native_bf16
    assert rel(decode, kernel) < 2e-2
    linear(x)  # the step is over: back to the kernel below 128 rows
    assert torch.equal(linear(x), kernel)


def test_the_fused_layers_follow_the_dense_copys_rows(monkeypatch):
    """Without AMX the C++ kernels (and so the fused decode layers) take a
    decode step's rows below the dense copy's threshold, a prefill's below 128."""
    monkeypatch.setattr(cpu_kernels, "amx_available", lambda: False)
    monkeypatch.setattr(cpu_kernels, "avx512_bf16_available", lambda: True)
    monkeypatch.setattr(cpu_quantized_paths, "cpu_has_native_bf16", lambda: True)
    dense = cpu_quantized_paths.DECODE_DENSE_FROM_ROWS
    for on_kernel in (cpu_quantized_paths.int4_rows_on_kernel, cpu_quantized_paths.int8_rows_on_kernel):
        assert on_kernel(dense - 1, True) and not on_kernel(dense, True)
    paths = cpu_quantized_paths
    assert paths.int4_rows_on_kernel(dense, False) and paths.int4_rows_on_kernel(127, False)
    assert not paths.int4_rows_on_kernel(128, False) and not paths.int8_rows_on_kernel(1, False)


@pytest.mark.skipif(not cpu_kernels.amx_available(), reason="the AMX int4 kernel needs a CPU with AMX")
def test_decode_batches_take_the_amx_kernel_until_an_update():
    """On AMX a decode step's 1 to 64 bfloat16 rows go through the AMX int4
    kernel (no dense copy made): up to 8 rows, in any forward, with the weight's
    unrounded values; from 9, in a decode step, with the dense copy's bfloat16
    ones. 9 rows outside a decode step keep torch's kernel. After a weight
    update (`unquantized`) the kernel's copy is made again from the new values."""

    torch.manual_seed(8)
    linear = Linear(96, 128)
    nn.init.normal_(linear.weight)
    quantize_linears(linear, int4_weight_only(32))
    x = torch.randn(64, 96).to(torch.bfloat16)
    with torch.inference_mode():
        assert "amx_copy" not in linear.weight.__dict__
        torch_kernel = linear(x[:9])  # an extend of 9 rows
        assert "amx_copy" not in linear.weight.__dict__
        few = linear(x[:8])
        assert "amx_copy" in linear.weight.__dict__
        with cpu_quantized_paths.decode_step():
            out = linear(x)
    assert "dense_copy" not in linear.weight.__dict__
    exact = int4_dequantized(linear.weight, linear.weight_scale)
    assert rel(few, x[:8].double() @ exact.double().T) < 4e-3
    assert rel(out, x.double() @ exact.to(torch.bfloat16).double().T) < 4e-3
    assert rel(torch_kernel, out[:9]) < 2e-2
    with unquantized(linear):
        linear.weight.data.mul_(-1)
    assert "amx_copy" not in linear.weight.__dict__
    with torch.inference_mode(), cpu_quantized_paths.decode_step():
        assert rel(linear(x[:8]), -few) < 2e-2 and rel(linear(x[:16]), -out[:16]) < 2e-2


def test_prefill_keeps_one_dequantized_copy_until_an_update():
    """The first prefill dequantizes the weight once and keeps the copy; a
    weight update (`unquantized`) drops it, so the next prefill sees the new
    values (checked against the int4 kernel, which reads the packed weight)."""
    torch.manual_seed(6)
    linear = Linear(64, 64)
    nn.init.normal_(linear.weight)
    quantize_linears(linear, int4_weight_only(32))
    x = torch.randn(INT8_DEQUANTIZE_FROM_ROWS, 64).to(torch.bfloat16)
    first = linear(x)
    copy = linear.weight.dense_copy
    assert torch.equal(linear(x), first) and linear.weight.dense_copy is copy  # made once
    with unquantized(linear):
        linear.weight.data.mul_(-1)
    prefill = linear(x)
    assert not hasattr(linear.weight, "dense_copy") or linear.weight.dense_copy is not copy
    kernel_rows = torch.cat([linear(x[i:i + 8]) for i in range(0, len(x), 8)])  # the int4 kernel's path
    assert rel(prefill, kernel_rows) < 2e-2 and rel(prefill, -first) < 5e-2
