"""--quantization fp8 and --torchao-config int8wo: each format's linear against
a reference computed from the dequantized values in float32, the quantizer's
error bound, which layers are quantized, the round trip weight updates rely
on, a whole tiny Llama against transformers with the same fake-quantized
weights (and, for FP8, activations), and the default model's answer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from radixserve.layers import cpu_kernels, cpu_quantized_paths
from radixserve.layers.quantization import (
    FP8, FP8_DTYPE, INT8_WEIGHT_ONLY, fp8_linear, int8_weight_only_linear, quantize_linears, quantize_per_row,
    unquantized,
)
from radixserve.layers.linear import Linear, MergedLinear
from tests.conftest import load_hf_model
from tests.models.deepseek_tiny import teacher_forced_logits

E4M3_MANTISSA_STEP = 2.0 ** -3  # 3 mantissa bits: neighbours differ by at most 1/8 of the value
E4M3_SMALLEST_STEP = 2.0 ** -9  # subnormal spacing, in units of the scale


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().view(-1, 1)


def test_quantize_per_row_error_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 96, generator=g) * torch.logspace(-3, 3, 32)[:, None]  # rows of very different sizes
    q, scale = quantize_per_row(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (32, 1)
    assert torch.allclose(dequantize(q, scale).abs().amax(1), x.abs().amax(1), rtol=1e-6, atol=0)  # row max kept
    err = (dequantize(q, scale) - x).abs()
    assert (err <= E4M3_MANTISSA_STEP / 2 * x.abs() + scale * E4M3_SMALLEST_STEP).all()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_equals_the_dequantized_product(bias, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 64, generator=g).to(dtype)
    w = torch.randn(48, 64, generator=g)
    b = torch.randn(48, generator=g).to(dtype) if bias else None
    wq, ws = quantize_per_row(w)
    out = fp8_linear(x, wq, ws.view(-1), b)
    xq, xs = quantize_per_row(x)
    reference = dequantize(xq, xs) @ dequantize(wq, ws).T + (b.float() if bias else 0)
    assert out.dtype == dtype and out.shape == (7, 48)
    assert rel(out, reference) < (1e-6 if dtype == torch.float32 else 1e-2)
    full = x.float() @ w.T + (b.float() if bias else 0)
    assert rel(out, full) < 5e-2  # what quantization costs on random data


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = MergedLinear(64, {"q": 64, "k": 32, "v": 32})
        self.gate = Linear(64, 16)  # a MoE router: kept
        self.odd = Linear(64, 40)  # not a multiple of 16: kept
        self.kv_b_proj = Linear(64, 64)  # named by the model: kept


def test_quantize_linears_picks_the_layers():
    torch.manual_seed(2)
    block = Block()
    for p in block.parameters():
        nn.init.normal_(p)
    assert quantize_linears(block, FP8, skip=("kv_b_proj",)) == 1
    assert block.qkv_proj.weight.dtype == FP8_DTYPE
    assert all(m.weight.dtype == torch.float32 for m in (block.gate, block.odd, block.kv_b_proj))


def test_unquantized_round_trip_and_partial_update():
    torch.manual_seed(3)
    block = Block()
    nn.init.normal_(block.qkv_proj.weight)
    quantize_linears(block, FP8)
    weight, scale = block.qkv_proj.weight, block.qkv_proj.weight_scale
    before_q, before_scale = weight.data.clone(), scale.clone()
    new_k = torch.randn(32, 64)
    with unquantized(block):
        real = block.qkv_proj.weight
        assert real.dtype == torch.float32
        assert torch.equal(real, dequantize(before_q, before_scale))
        block.qkv_proj.load_shard("k", "weight", new_k)
    # The same tensors (CUDA graphs hold their addresses), q and v rows untouched.
    assert block.qkv_proj.weight is weight and block.qkv_proj.weight_scale is scale
    untouched = torch.cat([torch.arange(0, 64), torch.arange(96, 128)])
    assert torch.equal(weight.data[untouched].view(torch.uint8), before_q[untouched].view(torch.uint8))
    assert torch.equal(scale[untouched], before_scale[untouched])
    assert rel(dequantize(weight.data[64:96], scale[64:96]), new_k) < 5e-2


def fake_quantize_linears(hf_model: nn.Module, dtype: torch.dtype = FP8_DTYPE, lm_head: bool = False) -> None:
    """transformers' model with our quantization applied by hand: each
    projection's weight replaced by its per-channel value in dtype (FP8 or
    int8), each input rounded per token to dtype before the matmul (the LM
    head too with lm_head, else it stays exact)."""
    for name, module in hf_model.named_modules():
        if isinstance(module, nn.Linear) and (lm_head or not name.endswith("lm_head")):
            q, scale = quantize_per_row(module.weight.data, dtype)
            module.weight.data = dequantize(q, scale)
            module.register_forward_pre_hook(lambda _, args: (dequantize(*quantize_per_row(args[0].reshape(
                -1, args[0].shape[-1]), dtype)).view(args[0].shape),))


def test_tiny_llama_matches_fake_quantized_transformers(tiny_model_factory):
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs

    path = tiny_model_factory("llama")
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (5, 23, 40)]
    runner = ModelRunner(ServerArgs(model_path=str(path), device="cpu", quantization="fp8", max_total_tokens=512))
    assert runner.model.model.layers[0].self_attn.qkv_proj.weight.dtype == FP8_DTYPE
    ours = teacher_forced_logits(runner, prompts, chunks=[16, 16, 16], decode_steps=0)
    hf = load_hf_model(path)
    exact = [hf(torch.tensor([p])).logits[0] for p in prompts]
    fake_quantize_linears(hf)
    with torch.no_grad():
        reference = [hf(torch.tensor([p])).logits[0] for p in prompts]
    for o, r, e in zip(ours, reference, exact):
        assert rel(o, r) < 1e-4  # the same arithmetic, up to float32 rounding (2e-7 measured)
        assert rel(o, e) > 10 * rel(o, r)  # the reference is not the unquantized model


def test_w8a8_int8_tiny_llama_matches_fake_quantized_transformers(tiny_model_factory):
    """--quantization w8a8_int8: int8 weights per channel and int8 activations
    per token, the LM head too; the int32 sums are exact, so only float32
    rounding of the scales separates it from transformers with the same rounding."""
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs

    path = tiny_model_factory("llama")
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (5, 23)]
    runner = ModelRunner(ServerArgs(model_path=str(path), device="cpu", quantization="w8a8_int8", max_total_tokens=512))
    assert runner.dtype == torch.float32 and runner.weight_format.name == "w8a8_int8"
    assert runner.model.lm_head.qweight.dtype == torch.int8
    ours = teacher_forced_logits(runner, prompts, chunks=[16, 16], decode_steps=0)
    hf = load_hf_model(path)
    exact = [hf(torch.tensor([p])).logits[0] for p in prompts]
    fake_quantize_linears(hf, torch.int8, lm_head=True)
    with torch.no_grad():
        reference = [hf(torch.tensor([p])).logits[0] for p in prompts]
    for o, r, e in zip(ours, reference, exact):
        assert rel(o, r) < 1e-4 and rel(o, e) > 10 * rel(o, r)


def test_w8a8_int8_is_cpu_only():
    from radixserve.server_args import ServerArgs

    with pytest.raises(ValueError, match="CPU only"):
        ServerArgs(quantization="w8a8_int8", device="cuda")


def test_engine_serves_fp8_and_takes_weight_updates(tiny_model_factory):
    """Through the Engine: a weight update into FP8 layers re-quantizes (new
    q_proj values read back within FP8's error, outputs change), and loading
    the original weights again gives back the original outputs exactly."""
    from radixserve import Engine

    path = tiny_model_factory("llama")
    hf = load_hf_model(path)
    name = "model.layers.0.self_attn.q_proj.weight"
    original = hf.state_dict()[name]
    changed = original + 0.5 * torch.randn(original.shape, generator=torch.Generator().manual_seed(5))
    params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    prompts = [[5, 6, 7, 8], [300, 200, 100]]
    with Engine(model_path=str(path), quantization="fp8", log_level="warning") as engine:
        before = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
        assert engine.update_weights_from_tensor([(name, changed)])[0]
        read = torch.tensor(engine.get_weights_by_name(name, truncate_size=original.numel()))
        assert rel(read, changed.flatten()) < 5e-2 and rel(read, original.flatten()) > 0.2
        after = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
        assert engine.update_weights_from_tensor([(name, original)])[0]
        again = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
    assert after != before and again == before


def test_int8_weight_only_linear_equals_the_dequantized_product():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 64, generator=g)
    w = torch.randn(48, 64, generator=g)
    wq, ws = quantize_per_row(w, torch.int8)
    assert wq.dtype == torch.int8 and (dequantize(wq, ws) - w).abs().max() <= ws.max() / 2 + 1e-6
    out = int8_weight_only_linear(x, wq, ws.view(-1), None)
    assert rel(out, x @ dequantize(wq, ws).T) < 1e-6
    fast = int8_weight_only_linear(x.bfloat16(), wq, ws.view(-1), None)  # the CPU's fast kernel
    assert fast.dtype == torch.bfloat16 and rel(fast, x @ dequantize(wq, ws).T) < 1e-2


@pytest.mark.skipif(not cpu_kernels.amx_available(), reason="the AMX int8 kernel needs a CPU with AMX")
def test_int8_decode_rows_take_the_amx_kernel_until_an_update():
    """On AMX a decode step's 1 to 32 bfloat16 rows times an int8 weight (the
    LM head's format) go through the AMX kernel, equal to the product with the
    dequantized weight, each row the same bits alone as among others (a batch-1
    step and a verify's rows); a prompt's row outside a decode step keeps torch's
    kernel; an update (`unquantized`) drops the kernel's copy, so the next step
    sees new values."""

    torch.manual_seed(9)
    linear = Linear(96, 64)
    nn.init.normal_(linear.weight)
    quantize_linears(linear, INT8_WEIGHT_ONLY)
    x = torch.randn(32, 96).to(torch.bfloat16)
    with torch.inference_mode():
        prompt_row = linear(x[:1])
        assert "amx_copy" not in linear.weight.__dict__
        with cpu_quantized_paths.decode_step():
            one = linear(x[:1])
            assert "amx_copy" in linear.weight.__dict__
            out = linear(x)
    dense = dequantize(linear.weight, linear.weight_scale.view(-1, 1)).to(torch.bfloat16)
    assert rel(out, x.double() @ dense.double().T) < 4e-3
    assert torch.equal(one, out[:1])
    assert rel(prompt_row, out[:1]) < 1e-2
    with unquantized(linear):
        linear.weight.data.mul_(-1)
    assert "amx_copy" not in linear.weight.__dict__
    with torch.inference_mode(), cpu_quantized_paths.decode_step():
        assert rel(linear(x[:2]), -out[:2]) < 1e-2


def test_int8_weight_only_tiny_llama_matches_transformers_with_the_same_weights(tiny_model_factory):
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs

    path = tiny_model_factory("llama")
    prompts = [torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(7)).tolist() for n in (6, 30)]
    # float32 activations: the same arithmetic as the reference, to float32 rounding
    runner = ModelRunner(ServerArgs(model_path=str(path), device="cpu", torchao_config="int8wo", dtype="float32",
                                    max_total_tokens=512))
    assert runner.model.lm_head.qweight.dtype == torch.int8
    ours = teacher_forced_logits(runner, prompts, chunks=[16, 16], decode_steps=0)
    hf = load_hf_model(path)
    with torch.no_grad():
        exact = [hf(torch.tensor([p])).logits[0] for p in prompts]
        for name, module in hf.named_modules():
            if isinstance(module, nn.Linear):  # the LM head too
                module.weight.data = dequantize(*quantize_per_row(module.weight.data, torch.int8))
        reference = [hf(torch.tensor([p])).logits[0] for p in prompts]
    for o, r, e in zip(ours, reference, exact):
        assert rel(o, r) < 1e-4 and rel(o, e) > 10 * rel(o, r)


def test_int8_weight_only_default_model_still_answers():
    from radixserve import Engine

    with Engine(model_path="SmolLM2-135M-Instruct", torchao_config="int8wo", log_level="warning") as engine:
        assert engine.get_server_info()["dtype"] == "bfloat16"
        out = engine.generate(prompt="The capital of France is", sampling_params={"temperature": 0,
                                                                                 "max_new_tokens": 4})
    assert "Paris" in out["text"]


def test_int8_weight_only_prefill_path_agrees_with_the_decode_kernel():
    # Many rows take the dequantize-and-GEMM path; the same rows a few at a time
    # take the int8 kernel: both are the dequantized product. The GEMM runs in
    # PREFILL_GEMM_DTYPE: bfloat16 on a CPU with bfloat16 units (its rounding), else float32.
    from radixserve.layers.cpu_quantized_paths import INT8_DEQUANTIZE_FROM_ROWS, PREFILL_GEMM_DTYPE

    g = torch.Generator().manual_seed(8)
    x = torch.randn(INT8_DEQUANTIZE_FROM_ROWS + 3, 64, generator=g)
    wq, ws = quantize_per_row(torch.randn(32, 64, generator=g), torch.int8)
    many = int8_weight_only_linear(x, wq, ws.view(-1), None)
    few = torch.cat([int8_weight_only_linear(x[i:i + 4], wq, ws.view(-1), None) for i in range(0, len(x), 4)])
    exact = x @ dequantize(wq, ws).T
    gemm_tol = 1e-6 if PREFILL_GEMM_DTYPE == torch.float32 else 1e-2
    assert rel(few, exact) < 1e-6 and rel(many, exact) < gemm_tol


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe"])
def test_moe_and_mla_models_keep_routers_and_latent_projection(family, tmp_path, embedded_tokenizer_dir):
    """The MoE routers and DeepSeek's kv_b_proj (absorbed attention reads its
    weight) stay unquantized; the models run, near their unquantized logits."""
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs
    from tests.models.deepseek_tiny import build_deepseek
    from tests.models.moe_tiny import build_moe_model

    if family == "deepseek_v3":
        build_deepseek("v3", 1000, tmp_path, embedded_tokenizer_dir)
    else:
        build_moe_model(family, embedded_tokenizer_dir, tmp_path)
    prompt = [[5, 6, 7, 8, 9, 10, 11]]
    logits = {}
    for fmt in ("none", "fp8", "int8wo"):
        flags = {"fp8": {"quantization": "fp8"}, "int8wo": {"torchao_config": "int8wo", "dtype": "float32"}}
        runner = ModelRunner(ServerArgs(model_path=str(tmp_path), device="cpu", max_total_tokens=256,
                                        **flags.get(fmt, {})))
        logits[fmt] = teacher_forced_logits(runner, prompt, chunks=[7], decode_steps=0)[0]
        kept = {name: m.weight.dtype for name, m in runner.model.named_modules()
                if name.endswith((".gate", ".kv_b_proj")) and hasattr(m, "weight")}
        assert kept and all(dtype == torch.float32 for dtype in kept.values()), kept
    for fmt in ("fp8", "int8wo"):
        assert rel(logits[fmt], logits["none"]) < (0.3 if fmt == "fp8" else 0.05)


def test_int8_formats_leave_input_sizes_the_kernel_gets_wrong_unquantized():
    """int8wo (and its LM head) quantizes only weights whose input size is a
    multiple of 16: torch's int8 CPU kernel returned infinities for 40 inputs.
    The 40-input layer stays exact, the 64-input one is quantized and close."""
    from radixserve.layers.linear import Linear

    g = torch.Generator().manual_seed(0)
    odd, even = Linear(40, 32), Linear(64, 32)
    for layer in (odd, even):
        layer.weight.data.copy_(torch.randn(layer.weight.shape, generator=g))
    model = torch.nn.Sequential(odd, even).to(torch.bfloat16)
    x40, x64 = (torch.randn(3, n, generator=g).to(torch.bfloat16) for n in (40, 64))
    exact40, exact64 = x40.float() @ odd.weight.float().T, x64.float() @ even.weight.float().T
    assert quantize_linears(model, INT8_WEIGHT_ONLY) == 1
    assert odd.weight_scale is None and even.weight_scale is not None
    with torch.no_grad():
        assert rel(odd(x40), exact40) < 1e-2 and rel(even(x64), exact64) < 1e-2
