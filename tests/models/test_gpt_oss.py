"""GPT-OSS against transformers on the same tiny random float32 weights:
sliding-window and full layers, attention sinks, the biased router, experts
with biases and the clamped SwiGLU (weights scaled so the clamp bites), YaRN;
prefill logits and greedy generations through the Engine with both attention
backends, prompts and generations longer than the window, chunked prefill,
radix-cache hits and concurrent requests. Then MXFP4: dequantization against
transformers' own and a per-element reading of the OCP MX spec, and an MXFP4
checkpoint loading to the same logits as its dequantized float version.
Mistral's sliding window is checked here too."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from radixserve import Engine
from radixserve.model_loader.weight_loader import get_weight, load_weights
from tests.conftest import assert_no_leak, hf_greedy, load_hf_model

WINDOW = 8
CLAMP = 7.0  # transformers' GptOssExperts.limit
PROMPT_LENS = [5, 13, 23, 34]  # all but the first longer than the window
SHARED_PREFIX = 12  # the last two prompts start alike: a radix hit past the window
NEW_TOKENS = 20
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
ROPE = dict(rope_type="yarn", rope_theta=150000.0, factor=8.0, beta_fast=32.0, beta_slow=1.0,
            truncate=False, original_max_position_embeddings=64)


def gpt_oss_config(vocab_size: int):
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"], sliding_window=WINDOW,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=dict(ROPE),
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


@torch.no_grad()
def randomize(hf) -> None:
    """from_config leaves expert biases at zero and the expert pre-activations
    far below the clamp: make every parameter random, the sinks and biases
    large enough to matter, and the expert weights large enough to clamp."""
    for name, p in hf.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            p.copy_(0.5 * torch.randn_like(p))
        elif name.endswith("sinks"):
            p.copy_(2 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.copy_(0.5 * torch.randn_like(p))
        else:
            p.copy_(0.1 * torch.randn_like(p))


def make_prompts(vocab: int) -> list:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]
    prompts[-1][:SHARED_PREFIX] = prompts[-2][:SHARED_PREFIX]
    return prompts


@pytest.fixture(scope="module")
def gpt_oss_setup(embedded_tokenizer_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gpt_oss_config(len(tok)), dtype=torch.float32)
    randomize(model)
    out = tmp_path_factory.mktemp("gpt_oss")
    model.save_pretrained(out, max_shard_size="2MB")
    for f in embedded_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    hf = load_hf_model(out)
    prompts = make_prompts(hf.config.vocab_size)
    expected = hf_greedy(hf, prompts, NEW_TOKENS)
    return out, hf, prompts, expected


def test_clamp_sinks_and_window_are_exercised(gpt_oss_setup):
    """The reference really clamps (else the clamp could be wrong unnoticed),
    and its layers are the kinds asked for, as are ours."""
    from radixserve.model_loader.loader import load_model
    from radixserve.model_loader.source import resolve_model_source
    from radixserve.utils.hf_utils import load_config

    path, hf, prompts, _ = gpt_oss_setup
    seen = {"gate": 0.0, "up": 0.0}

    def recording(original):
        def apply_gate(gate_up):
            seen["gate"] = max(seen["gate"], gate_up[..., ::2].max().item())
            seen["up"] = max(seen["up"], gate_up[..., 1::2].abs().max().item())
            return original(gate_up)
        return apply_gate

    for layer in hf.model.layers:
        layer.mlp.experts._apply_gate = recording(layer.mlp.experts._apply_gate)
    try:
        with torch.no_grad():
            hf(torch.tensor([prompts[-1]]))
    finally:
        for layer in hf.model.layers:
            del layer.mlp.experts._apply_gate
    assert seen["gate"] > CLAMP and seen["up"] > CLAMP, seen
    assert [layer.self_attn.sliding_window for layer in hf.model.layers] == [WINDOW, None]

    source = resolve_model_source(str(path))
    ours = load_model(source, load_config(source), torch.float32, torch.device("cpu"))
    attns = [layer.self_attn.attn for layer in ours.model.layers]
    assert [a.sliding_window for a in attns] == [WINDOW, None]
    assert torch.equal(attns[1].sinks, hf.model.layers[1].self_attn.sinks)
    assert ours.model.layers[0].mlp.experts.activation.limit == CLAMP
    # Fused expert weights read back in the checkpoint's interleaved layout.
    for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
        theirs = getattr(hf.model.layers[1].mlp.experts, name)
        assert torch.equal(get_weight(ours, f"model.layers.1.mlp.experts.{name}"), theirs), name


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
def test_prefill_logits_match(gpt_oss_setup, backend):
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs
    from tests.models.prefill import prefill_all_logits

    path, hf, prompts, _ = gpt_oss_setup
    runner = ModelRunner(ServerArgs(model_path=str(path), device="cpu", max_total_tokens=1024,
                                    attention_backend=backend))
    for ids, ours in zip(prompts, prefill_all_logits(runner, prompts)):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        rel = (ours - ref).norm() / ref.norm()
        assert rel < 1e-4, (len(ids), rel)


# Triton runs in the CPU interpreter here: fewer decode steps (still past the window).
@pytest.mark.parametrize("backend,page_size,new_tokens,new_tokens_again",
                         [("torch_native", 1, NEW_TOKENS, NEW_TOKENS), ("triton", 4, 12, 4)])
def test_greedy_matches_generate(gpt_oss_setup, backend, page_size, new_tokens, new_tokens_again):
    """All prompts at once (a batch), in chunks of 8 tokens, then again so
    every prompt (the shared prefix too) comes from the radix cache."""
    path, _, prompts, expected = gpt_oss_setup
    with Engine(model_path=str(path), attention_backend=backend, page_size=page_size, chunked_prefill_size=8,
                max_total_tokens=512, log_level="warning") as engine:
        outs = engine.generate(input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": new_tokens})
        assert [o["output_ids"] for o in outs] == [e[:new_tokens] for e in expected]
        again = engine.generate(input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": new_tokens_again})
        assert [o["output_ids"] for o in again] == [e[:new_tokens_again] for e in expected]
        assert all(o["meta_info"]["cached_tokens"] > WINDOW for o in again[1:])
        assert_no_leak(engine)


# --- MXFP4 -------------------------------------------------------------------------------------

E2M1_MAX = 6.0


def quantize_mxfp4(w: torch.Tensor):
    """OCP MX: per 32 values along the last axis, a shared exponent
    floor(log2(amax)) - 2 (E2M1's largest exponent), each value rounded to the
    nearest E2M1 code (saturating). [..., K] -> (blocks uint8 [..., K/32, 16]
    low nibble first, scales uint8 [..., K/32] biased by 127)."""
    codes_values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    groups = w.float().reshape(*w.shape[:-1], -1, 32)
    amax = groups.abs().amax(-1).clamp_min(2.0 ** -120)
    shared_exp = torch.floor(torch.log2(amax)) - 2
    scaled = (groups / torch.exp2(shared_exp)[..., None]).clamp(-E2M1_MAX, E2M1_MAX)
    magnitude = (scaled.abs()[..., None] - codes_values).abs().argmin(-1)
    codes = (magnitude | ((scaled < 0).long() << 3)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (shared_exp + 127).to(torch.uint8)


def spec_value(code: int, scale: int) -> float:
    """One E2M1 code times an E8M0 scale, from the bit fields (OCP MX v1.0)."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 0b1
    magnitude = mantissa * 0.5 if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2)
    return sign * magnitude * 2.0 ** (scale - 127)


def checkpoint_layout(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-element reference of a whole tensor: [E, rows, G, 16] -> [E, G*32, rows]."""
    experts, rows, groups, _ = blocks.shape
    out = torch.empty(experts, groups * 32, rows)
    for e in range(experts):
        for r in range(rows):
            for g in range(groups):
                for b in range(16):
                    byte, scale = int(blocks[e, r, g, b]), int(scales[e, r, g])
                    out[e, g * 32 + 2 * b, r] = spec_value(byte & 0x0F, scale)
                    out[e, g * 32 + 2 * b + 1, r] = spec_value(byte >> 4, scale)
    return out


def test_mxfp4_dequantization_matches_transformers_and_the_spec():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from radixserve.model_loader.mxfp4 import dequantize_mxfp4

    g = torch.Generator().manual_seed(3)
    # Groups of very different magnitudes, some zero: scales far apart.
    w = torch.randn(3, 64, 40, generator=g) * torch.exp2(torch.randint(-12, 8, (3, 1, 40), generator=g).float())
    w[1, :32, 5] = 0.0
    blocks, scales = quantize_mxfp4(w.transpose(1, 2))  # rows = output features, as checkpoints store them
    assert blocks.shape == (3, 40, 2, 16) and scales.shape == (3, 40, 2)
    ours = dequantize_mxfp4(blocks, scales, torch.float32)
    assert ours.shape == w.shape
    assert torch.equal(ours, checkpoint_layout(blocks, scales))
    assert torch.equal(dequantize_mxfp4(blocks, scales), convert_moe_packed_tensors(blocks, scales))
    # The quantizer round-trips within E2M1's spacing (largest step 2 at the top of a group).
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, -1).transpose(1, 2)
    assert ((ours - w).abs() <= 2 * step).all()
    assert (ours - w).abs().max() > 0  # really quantized


def test_mxfp4_checkpoint_loads_like_its_dequantized_float_version(gpt_oss_setup, tmp_path):
    from safetensors.torch import save_file

    from radixserve.model_loader.mxfp4 import dequantize_mxfp4
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.server_args import ServerArgs
    from tests.models.prefill import prefill_all_logits

    path, hf, prompts, _ = gpt_oss_setup
    plain, packed = {}, {}
    for name, tensor in hf.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(tensor.transpose(1, 2).contiguous())
            packed[f"{name}_blocks"], packed[f"{name}_scales"] = blocks, scales
            plain[name] = dequantize_mxfp4(blocks, scales, torch.float32)
        else:
            plain[name] = packed[name] = tensor.contiguous()
    config = json.loads((path / "config.json").read_text())
    logits = {}
    for kind, tensors in (("float", plain), ("mxfp4", packed)):
        folder = tmp_path / kind
        shutil.copytree(path, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
        if kind == "mxfp4":
            config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
        (folder / "config.json").write_text(json.dumps(config))
        # Halves of a pair in different files, scales first: the loader pairs them.
        names = sorted(tensors, key=lambda n: (not n.endswith("_scales"), n))
        save_file({n: tensors[n] for n in names[: len(names) // 2]}, folder / "model-00001-of-00002.safetensors")
        save_file({n: tensors[n] for n in names[len(names) // 2:]}, folder / "model-00002-of-00002.safetensors")
        runner = ModelRunner(ServerArgs(model_path=str(folder), device="cpu", max_total_tokens=256))
        logits[kind] = prefill_all_logits(runner, prompts[-1:])[0]
    assert torch.equal(logits["mxfp4"], logits["float"])
    # The quantization changed the model: this is not the float checkpoint twice.
    with torch.no_grad():
        original = hf(torch.tensor([prompts[-1]])).logits[0]
    assert not torch.allclose(logits["float"], original, rtol=1e-3, atol=1e-3)
    # Nothing on the serving path refuses a config with a quantization_config.
    with Engine(model_path=str(tmp_path / "mxfp4"), log_level="warning") as engine:
        out = engine.generate(input_ids=prompts[-1], sampling_params={**GREEDY, "max_new_tokens": 2})
        assert out["output_ids"][0] == logits["mxfp4"][-1].argmax().item()
        assert_no_leak(engine)


# --- Mistral's sliding window ---------------------------------------------------------------------


def single_request_batch(backend, seq_len: int, num_layers: int, kv_heads: int, head_dim: int):
    from radixserve.mem_cache.allocator import KVPool, ReqToTokenPool, TokenAllocator
    from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode

    cpu = torch.device("cpu")
    allocator = TokenAllocator(seq_len + 8, 1, cpu)
    table = ReqToTokenPool(2, seq_len + 8, cpu)
    row = table.alloc()
    slots = allocator.alloc_extend([0], [seq_len], [0])
    table.req_to_token[row, :seq_len] = slots
    fb = ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=1, input_ids=torch.zeros(seq_len, dtype=torch.int64),
        positions=torch.arange(seq_len), req_pool_indices=torch.tensor([row]), seq_lens=torch.tensor([seq_len]),
        out_cache_loc=slots, seq_lens_cpu=[seq_len], extend_prefix_lens=torch.tensor([0]),
        extend_seq_lens=torch.tensor([seq_len]), extend_start_loc=torch.tensor([0]), extend_prefix_lens_cpu=[0],
        extend_seq_lens_cpu=[seq_len], req_to_token_pool=table,
        kv_pool=KVPool(allocator.num_slots, num_layers, kv_heads, head_dim, torch.float32, cpu), attn_backend=backend,
    )
    backend.init_forward_metadata(fb)
    return fb


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
def test_mistral_sliding_window_matches_transformers(backend):
    from transformers import AutoModelForCausalLM, MistralConfig

    from radixserve.layers.attention.torch_native import TorchNativeAttnBackend
    from radixserve.layers.attention.triton_attn_backend import TritonAttnBackend
    from radixserve.models.registry import get_model_class

    config = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=WINDOW, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    ours = get_model_class(config)(config).eval()
    with torch.no_grad():
        load_weights(ours, hf.state_dict().items())
    seq_len = 40
    ids = torch.randint(0, 256, (seq_len,), generator=torch.Generator().manual_seed(2))
    attn_backend = TorchNativeAttnBackend() if backend == "torch_native" else TritonAttnBackend(torch.device("cpu"))
    fb = single_request_batch(attn_backend, seq_len, 2, 2, 16)
    with torch.no_grad():
        got = ours.compute_logits(ours(ids, fb.positions, fb))
        ref = hf(ids[None]).logits[0]
        full_config = copy.deepcopy(config)
        full_config.sliding_window = None
        full_context = AutoModelForCausalLM.from_config(full_config, dtype=torch.float32).eval()
        full_context.load_state_dict(hf.state_dict())
        unwindowed = full_context(ids[None]).logits[0]
    assert ((got - ref).norm() / ref.norm()) < 1e-4
    assert ((unwindowed - ref).norm() / ref.norm()) > 1e-2  # the window matters at this length


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_path_matches_generate(gpt_oss_setup):
    """On CUDA, float32: windowed and sink-aware Triton attention, the fused MoE
    kernel with biases and the clamp, decode CUDA graphs and the overlap
    schedule give transformers' greedy tokens, past the window, with radix hits."""
    path, _, prompts, expected = gpt_oss_setup
    with Engine(model_path=str(path), dtype="float32", chunked_prefill_size=8, log_level="warning") as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == expected
        again = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in again] == expected
        assert_no_leak(engine)
