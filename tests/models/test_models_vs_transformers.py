"""Our model files against transformers on the same tiny random weights (float32).

The attention backend here is a test-only one: plain causal GQA over a single
sequence, so these tests check the model math alone (no KV cache, no batching).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from radixserve.layers.rotary import rope_parameters, rotary_inv_freq
from radixserve.model_loader.weight_loader import load_weights
from radixserve.models.llama import LlamaForCausalLM, MistralForCausalLM
from radixserve.models.qwen2 import Qwen2ForCausalLM
from radixserve.models.qwen3 import Qwen3ForCausalLM
from radixserve.models.registry import get_model_class, supported_architectures

SEQ_LEN = 40
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=32)
YARN_ROPE = dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0, original_max_position_embeddings=64)


class SingleSequenceCausalAttention:
    """Test-only backend: q, k, v hold one whole sequence; causal GQA via SDPA."""

    def forward(self, q, k, v, layer, forward_batch, cached=False):
        assert not cached  # no pool here: the model must pass k and v
        t = q.shape[0]
        q = q.view(t, layer.num_heads, layer.head_dim).transpose(0, 1)
        k = k.view(t, layer.num_kv_heads, layer.head_dim).transpose(0, 1)
        v = v.view(t, layer.num_kv_heads, layer.head_dim).transpose(0, 1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.scaling,
                                             enable_gqa=layer.num_heads != layer.num_kv_heads)
        return out.transpose(0, 1).reshape(t, layer.num_heads * layer.head_dim)


def forward_batch():
    return SimpleNamespace(attn_backend=SingleSequenceCausalAttention())


def make_config(kind: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[kind]
    return cls(**{**TINY, **overrides})


CASES = {
    "llama3_rope_untied": ("llama", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_biases_linear_rope": ("llama", dict(attention_bias=True, mlp_bias=True, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "mistral": ("mistral", dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2_yarn": ("qwen2", dict(tie_word_embeddings=False, rope_parameters=YARN_ROPE)),
    "qwen3_head_dim": ("qwen3", dict(head_dim=32, tie_word_embeddings=False)),
}


@torch.no_grad()
def build_hf(kind: str, **overrides):
    """A transformers model with every parameter random (HF inits biases to zero
    and norms to one, which would hide loading mistakes)."""
    from transformers import AutoModelForCausalLM

    config = make_config(kind, **overrides)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    for name, p in hf.named_parameters():
        p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return hf


def build_ours(hf, dtype=torch.float32):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = get_model_class(hf.config)(hf.config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        load_weights(model, hf.state_dict().items())
    return model.eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


@torch.no_grad()
def logits_pair(hf, model):
    ids = torch.randint(0, hf.config.vocab_size, (SEQ_LEN,), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(SEQ_LEN)
    ours = model.compute_logits(model(ids, positions, forward_batch()))
    ref = hf(ids[None]).logits[0]
    return ours, ref


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    kind, overrides = CASES[case]
    hf = build_hf(kind, **overrides)
    model = build_ours(hf)
    ours, ref = logits_pair(hf, model)
    assert ours.dtype == torch.float32 and ours.shape == (SEQ_LEN, hf.config.vocab_size)
    assert rel_err(ours, ref) < 1e-4, case
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_tied_head_is_the_embedding_and_checkpoint_head_is_ignored():
    hf = build_hf("llama", tie_word_embeddings=True)
    model = build_ours(hf)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    state = dict(hf.state_dict())
    state["lm_head.weight"] = torch.zeros_like(state["model.embed_tokens.weight"])
    load_weights(model, state.items())  # ignored: the embedding stays the head
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])
    untied = build_ours(build_hf("llama", tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_fused_parameters_and_no_rotary_parameters():
    model = build_ours(build_hf("qwen3", head_dim=32))
    names = dict(model.named_parameters())
    assert names["model.layers.0.self_attn.qkv_proj.weight"].shape == ((4 + 2 + 2) * 32, 64)
    assert names["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 128, 64)
    assert "model.layers.0.self_attn.q_norm.weight" in names
    assert not any("rotary" in n for n in names)
    assert not any("rotary" in n for n in model.state_dict())
    # One cos/sin table for the whole model, not one per layer.
    tables = {id(layer.self_attn.rotary_emb) for layer in model.model.layers}
    assert len(tables) == 1


def test_built_on_the_callers_device():
    """The loader builds under `with torch.device(dev)`: every tensor, the rotary
    table included, must land there (meta stands in for a GPU)."""
    config = make_config("llama", rope_parameters=dict(LLAMA3_ROPE))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


def test_float32_checkpoint_loads_into_bf16():
    hf = build_hf("qwen2", tie_word_embeddings=True)
    model = build_ours(hf, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.qkv_proj.bias.dtype == torch.bfloat16
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32
    ours, ref = logits_pair(hf, model)
    assert ours.dtype == torch.float32
    assert rel_err(ours, ref) < 5e-2


def test_unexpected_and_missing_weights_are_named():
    hf = build_hf("llama")
    model = build_ours(hf)
    state = hf.state_dict()
    with pytest.raises(ValueError, match="unexpected weight 'model.layers.0.mlp.extra.weight'"):
        load_weights(model, [("model.layers.0.mlp.extra.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="has shape"):
        load_weights(model, [("model.norm.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match=r"shard 'k'.*expected \(32, 64\)"):
        load_weights(model, [("model.layers.0.self_attn.k_proj.weight", torch.zeros(16, 64))])
    partial = [(n, t) for n, t in state.items() if "layers.1.self_attn.v_proj" not in n]
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.self_attn\.qkv_proj\.weight:v"):
        load_weights(model, partial)
    load_weights(model, partial, strict=False)  # a partial update is allowed when asked for
    extra = list(state.items()) + [("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8))]
    load_weights(model, extra)  # recomputed buffers in old checkpoints are skipped


# --- rotary against transformers' own inverse frequencies -------------------------------


@pytest.mark.parametrize("rope", [
    dict(rope_type="default", rope_theta=10000.0),
    dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
    LLAMA3_ROPE,
    YARN_ROPE,
    dict(YARN_ROPE, mscale=1.0, mscale_all_dim=0.5, beta_fast=16, beta_slow=2),
    dict(YARN_ROPE, attention_factor=1.3, truncate=False),
])
def test_rotary_frequencies_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = make_config("llama", head_dim=32, rope_parameters=dict(rope))
    kind = config.rope_parameters["rope_type"]
    init = ROPE_INIT_FUNCTIONS.get(kind) if kind != "default" else None
    if init is None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        ref_freq, ref_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(config, "cpu")
    else:
        ref_freq, ref_scale = init(config, "cpu")
    ours, scale = rotary_inv_freq(32, rope_parameters(config), config.max_position_embeddings)
    torch.testing.assert_close(ours.float(), ref_freq.float(), rtol=1e-6, atol=0)
    assert math.isclose(scale, ref_scale, rel_tol=1e-6)
    if kind in ("llama3", "yarn"):  # the scaling really changes something
        plain, _ = rotary_inv_freq(32, dict(rope_type="default", rope_theta=rope["rope_theta"]), 256)
        assert not torch.allclose(ours, plain)


def test_rope_parameters_from_old_style_config():
    old = SimpleNamespace(rope_theta=123.0, rope_scaling={"type": "linear", "factor": 2.0},
                          max_position_embeddings=99)
    params = rope_parameters(old)
    assert params["rope_type"] == "linear" and params["rope_theta"] == 123.0 and params["factor"] == 2.0
    bare = rope_parameters(SimpleNamespace(max_position_embeddings=99))
    assert bare["rope_type"] == "default" and bare["rope_theta"] == 10000.0
    new = rope_parameters(make_config("llama", rope_parameters=dict(LLAMA3_ROPE)))
    assert new["rope_type"] == "llama3" and new["original_max_position_embeddings"] == 32
    with pytest.raises(ValueError, match="unsupported rope_type 'longrope'"):
        rotary_inv_freq(16, dict(rope_type="longrope", rope_theta=1.0), 8)


# --- registry -----------------------------------------------------------------------------


def test_registry_resolves_architectures_and_model_types():
    from transformers import GPT2Config

    for arch, cls in [("LlamaForCausalLM", LlamaForCausalLM), ("MistralForCausalLM", MistralForCausalLM),
                      ("Qwen2ForCausalLM", Qwen2ForCausalLM), ("Qwen3ForCausalLM", Qwen3ForCausalLM)]:
        assert get_model_class(SimpleNamespace(architectures=[arch], model_type="x")) is cls
        assert arch in supported_architectures()
    # GGUF-derived configs carry only a model_type.
    for kind, cls in [("llama", LlamaForCausalLM), ("mistral", MistralForCausalLM),
                      ("qwen2", Qwen2ForCausalLM), ("qwen3", Qwen3ForCausalLM)]:
        config = make_config(kind)
        config.architectures = None
        assert get_model_class(config) is cls
    with pytest.raises(ValueError, match="LlamaForSequenceClassification.*supported: .*LlamaForCausalLM"):
        get_model_class(SimpleNamespace(architectures=["LlamaForSequenceClassification"], model_type="llama"))
    with pytest.raises(ValueError, match="gpt2"):
        get_model_class(SimpleNamespace(architectures=None, model_type="gpt2"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        get_model_class(GPT2Config(architectures=["GPT2LMHeadModel"]))
