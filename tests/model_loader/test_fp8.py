"""Block-scaled FP8 checkpoints: the dequantization against a per-block loop,
the pairing of weights with their scales, and a tiny DeepSeek-V3 saved as FP8
loaded (and reloaded as a weight update) against its dequantized reference."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from radixserve.model_loader.fp8 import BlockFP8Weights, block_fp8_size, dequantize_block_fp8
from radixserve.model_loader.weight_loader import get_weight
from tests.models.deepseek_tiny import build_deepseek

FP8_MAX = 448.0  # largest float8_e4m3fn value
BLOCK = (16, 16)  # the tiny model's dims (40, 48, 96, ...) leave partial blocks


def quantize_per_block(w: torch.Tensor, block):
    """(fp8 [r, c], scale_inv [ceil(r/B0), ceil(c/B1)]) with each block scaled to the fp8 range."""
    rows, cols = w.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(grid, dtype=torch.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].float()
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (tile / scale[i, j]).to(q.dtype)
    return q, scale


def dequantize_per_block(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows = slice(i * block[0], (i + 1) * block[0])
            cols = slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = q[rows, cols].float() * scale[i, j]
    return out


def test_dequantize_matches_a_per_block_loop():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g) * torch.logspace(-2, 1, 200)  # blocks of unlike ranges
    q, scale = quantize_per_block(w, (128, 128))  # 3 x 2 blocks, the last ones partial
    ours = dequantize_block_fp8(q, scale, (128, 128))
    assert ours.dtype == torch.float32
    assert torch.equal(ours, dequantize_per_block(q, scale, (128, 128)))
    assert ((ours - w).norm() / w.norm()) < 0.05  # and it is w, to fp8 precision
    with pytest.raises(ValueError, match="needs scales"):
        dequantize_block_fp8(q, scale[:, :1], (128, 128))


def test_weights_pair_with_scales_in_either_order():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(20, 40, generator=g), torch.randn(33, 17, generator=g)
    (qa, sa), (qb, sb) = quantize_per_block(a, BLOCK), quantize_per_block(b, BLOCK)
    norm = torch.ones(5, dtype=torch.bfloat16)
    stream = [("x.weight_scale_inv", sa), ("norm.weight", norm), ("y.weight", qb), ("x.weight", qa),
              ("y.weight_scale_inv", sb)]
    out = list(BlockFP8Weights(stream, BLOCK))
    assert [n for n, _ in out] == ["norm.weight", "x.weight", "y.weight"]
    assert out[0][1] is norm
    assert torch.equal(out[1][1], dequantize_per_block(qa, sa, BLOCK))
    assert torch.equal(out[2][1], dequantize_per_block(qb, sb, BLOCK))
    with pytest.raises(ValueError, match="without their pair: z.weight"):
        list(BlockFP8Weights([("z.weight", qa)], BLOCK))


def test_config_detection():
    assert block_fp8_size({"quant_method": "fp8", "weight_block_size": [128, 128]}) == (128, 128)
    assert block_fp8_size({"quant_method": "mxfp4"}) is None and block_fp8_size(None) is None
    with pytest.raises(ValueError, match="block-wise"):
        block_fp8_size({"quant_method": "fp8"})


def is_quantized_in_deepseek(name: str, tensor: torch.Tensor) -> bool:
    """DeepSeek-V3 stores its linear layers in fp8; norms, router, embeddings and head not."""
    skip = ("norm", "embed_tokens", "lm_head", "mlp.gate.")
    return tensor.dim() == 2 and not any(s in name for s in skip)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """(fp8 folder, reference folder with the dequantized weights in float32)."""
    from radixserve.model_loader.hf_weights import HFWeights

    saved, fp8_dir, ref_dir = (tmp_path_factory.mktemp(n) for n in ("v3_saved", "v3_fp8", "v3_ref"))
    build_deepseek("v3", 256, saved)
    state = dict(HFWeights(saved))  # per-expert names, as released checkpoints have them
    quantized, reference = {}, {}
    for name, tensor in state.items():
        if is_quantized_in_deepseek(name, tensor):
            q, scale = quantize_per_block(tensor, BLOCK)
            quantized[name], quantized[name + "_scale_inv"] = q, scale
            reference[name] = dequantize_per_block(q, scale, BLOCK)
        else:
            quantized[name] = reference[name] = tensor
    # Two files, scales apart from their weights, as in real sharded checkpoints.
    names = sorted(quantized)
    halves = {"model-00001-of-00002.safetensors": names[1::2], "model-00002-of-00002.safetensors": names[0::2]}
    for file, part in halves.items():
        save_file({n: quantized[n] for n in part}, str(fp8_dir / file))
    (fp8_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, part in halves.items() for n in part}}))
    save_file(reference, str(ref_dir / "model.safetensors"))
    config = json.loads((saved / "config.json").read_text())
    (ref_dir / "config.json").write_text(json.dumps(config))
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(BLOCK)}
    (fp8_dir / "config.json").write_text(json.dumps(config))
    assert sum(t.dtype == torch.float8_e4m3fn for t in quantized.values()) > 20
    return fp8_dir, ref_dir


def test_fp8_checkpoint_loads_as_its_dequantized_weights(fp8_checkpoint):
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs
    from tests.conftest import load_hf_model
    from tests.models.prefill import prefill_all_logits

    fp8_dir, ref_dir = fp8_checkpoint
    runner = ModelRunner(ServerArgs(model_path=str(fp8_dir), device="cpu", max_total_tokens=512))
    reference = ModelRunner(ServerArgs(model_path=str(ref_dir), device="cpu", max_total_tokens=512))
    ours, theirs = dict(runner.model.named_parameters()), dict(reference.model.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)

    hf = load_hf_model(ref_dir)
    prompt = torch.randint(10, 256, (23,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]

    def rel_err() -> float:
        logits = prefill_all_logits(runner, [prompt])[0]
        return ((logits - ref).norm() / ref.norm()).item()

    assert rel_err() < 1e-4
    # A weight update from the fp8 folder goes through the same dequantization.
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    runner.update_weights_from_tensor([(name, torch.zeros_like(get_weight(runner.model, name)))])
    assert rel_err() > 1e-2
    runner.update_weights_from_disk(str(fp8_dir))
    assert rel_err() < 1e-4


def test_fp8_checkpoint_served_in_fp8(fp8_checkpoint):
    """--quantization fp8 on a block-FP8 checkpoint: its linears stay E4M3 with
    the checkpoint's own values and block scales, and compute what the
    dequantized weights compute (the CPU path multiplies the activations
    unquantized, as the GPU's decode path does), through chunked extends and
    decode steps; weight updates from a trainer and from the checkpoint."""
    from safetensors import safe_open

    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs
    from tests.models.deepseek_tiny import teacher_forced_logits

    fp8_dir, ref_dir = fp8_checkpoint
    runner = ModelRunner(ServerArgs(model_path=str(fp8_dir), device="cpu", max_total_tokens=512, quantization="fp8"))
    reference = ModelRunner(ServerArgs(model_path=str(ref_dir), device="cpu", max_total_tokens=512))
    params = dict(runner.model.named_parameters())
    checkpoint = {}
    for file in fp8_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            checkpoint.update({n: f.get_tensor(n) for n in f.keys()})
    # Stored as in the checkpoint: a Linear's weight and scales as they are ...
    o_proj = "model.layers.1.self_attn.o_proj.weight"
    assert params[o_proj].dtype == torch.float8_e4m3fn
    assert torch.equal(params[o_proj].view(torch.uint8), checkpoint[o_proj].view(torch.uint8))
    assert torch.equal(params[o_proj + "_scale"], checkpoint[o_proj + "_scale_inv"])
    merged = params["model.layers.0.mlp.gate_up_proj.weight_scale"]  # gate's block rows, then up's
    assert torch.equal(merged, torch.cat([checkpoint[f"model.layers.0.mlp.{p}_proj.weight_scale_inv"]
                                          for p in ("gate", "up")]))
    merged = params["model.layers.0.self_attn.q_kv_a_proj.weight_scale"]  # q_a's, then kv_a's
    assert torch.equal(merged, torch.cat([checkpoint[f"model.layers.0.self_attn.{p}.weight_scale_inv"]
                                          for p in ("q_a_proj", "kv_a_proj_with_mqa")]))
    fp8_names = {n for n, p in params.items() if p.dtype == torch.float8_e4m3fn}
    # q_a|kv_a, q_b, o and the dense MLP's or the shared experts' gate_up and down, in 3 layers
    assert len(fp8_names) == 3 * 5 + 2 * 2  # and the routed experts' w13 and w2 in the 2 MoE layers
    # ... and the weights the model reads itself (absorbed attention's kv_b_proj), dequantized.
    assert params["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.float32

    g = torch.Generator().manual_seed(3)
    sequences = [torch.randint(10, 256, (12,), generator=g).tolist() for _ in range(2)]

    def logits(r):
        return torch.cat(teacher_forced_logits(r, sequences, chunks=[3, 7], decode_steps=2))

    ours, ref = logits(runner), logits(reference)
    assert ((ours - ref).norm() / ref.norm()) < 1e-5
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))

    # A trainer's update loads into dequantized copies, quantized back into the same FP8 tensors ...
    before = params[o_proj].clone()
    runner.update_weights_from_tensor([(o_proj, torch.zeros(64, 96))])
    assert params[o_proj] is runner.model.get_parameter(o_proj) and params[o_proj].dtype == torch.float8_e4m3fn
    assert not params[o_proj].float().any() and (params[o_proj + "_scale"] < 1e-12).all()  # (all-zero blocks)
    # ... and one from the FP8 checkpoint straight into them: the checkpoint's bytes again.
    runner.update_weights_from_disk(str(fp8_dir))
    assert torch.equal(params[o_proj].view(torch.uint8), before.view(torch.uint8))
    assert torch.equal(params[o_proj + "_scale"], checkpoint[o_proj + "_scale_inv"])
    assert ((logits(runner) - ref).norm() / ref.norm()) < 1e-5


def test_dummy_weights_of_a_block_fp8_config_stay_fp8(fp8_checkpoint):
    """--load-format dummy (benchmarking DeepSeek-V3's shapes without its
    files): E4M3 values over their whole range, small positive block scales."""
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs

    runner = ModelRunner(ServerArgs(model_path=str(fp8_checkpoint[0]), device="cpu", max_total_tokens=512,
                                    quantization="fp8", load_format="dummy"))
    params = dict(runner.model.named_parameters())
    for name in ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp.experts.w13"):
        weight = params[name + (".weight" if "proj" in name else "")]
        scale = params[name + (".weight_scale" if "proj" in name else "_scale")]
        assert weight.dtype == torch.float8_e4m3fn and weight.float().abs().max() > 100
        assert (scale > 0).all() and (scale < 1e-3).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_checkpoint_kept_in_fp8_on_gpu(fp8_checkpoint):
    """On CUDA a block-FP8 checkpoint stays FP8 by default. Decode-sized
    forwards (up to 16 rows: activations unquantized, the GEMV for one row)
    compute the dequantized model's logits; a 23-token prefill, whose
    activations go through E4M3, stays close and picks mostly the same tokens."""
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs
    from tests.models.deepseek_tiny import teacher_forced_logits

    fp8_dir, ref_dir = fp8_checkpoint
    common = dict(device="cuda", dtype="float32", max_total_tokens=512, disable_cuda_graph=True)
    runner = ModelRunner(ServerArgs(model_path=str(fp8_dir), **common))
    reference = ModelRunner(ServerArgs(model_path=str(ref_dir), **common))
    assert runner.model.model.layers[1].mlp.experts.w13.dtype == torch.float8_e4m3fn
    g = torch.Generator().manual_seed(4)
    small = [torch.randint(10, 256, (12,), generator=g).tolist()]  # 4 rows, 6, then one (the GEMV) twice
    ours = torch.cat(teacher_forced_logits(runner, small, chunks=[4, 6], decode_steps=2))
    ref = torch.cat(teacher_forced_logits(reference, small, chunks=[4, 6], decode_steps=2))
    assert ((ours - ref).norm() / ref.norm()) < 1e-4
    prompt = [torch.randint(10, 256, (23,), generator=g).tolist()]
    ours = teacher_forced_logits(runner, prompt, chunks=[23], decode_steps=0)[0]
    ref = teacher_forced_logits(reference, prompt, chunks=[23], decode_steps=0)[0]
    assert ((ours - ref).norm() / ref.norm()) < 0.3
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.7
