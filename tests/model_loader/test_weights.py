"""Weight loading against transformers' own loaders, and clear errors for bad paths."""

from __future__ import annotations

import pytest
import torch

from radixserve.model_loader.loader import iterate_weights
from radixserve.model_loader.source import resolve_model_source
from radixserve.models.registry import get_model_class, supported_architectures
from radixserve.utils.hf_utils import get_eos_token_ids, load_config, load_tokenizer


def test_gguf_matches_transformers_dequantization():
    """transformers dequantizes and un-permutes GGUF itself: an independent reference."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_source("SmolLM2-135M-Instruct")
    config = load_config(source)
    ref = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.path.name,
                                               dtype=torch.float32).state_dict()
    ours = dict(iterate_weights(source, config))
    assert "lm_head.weight" not in ours  # tied embeddings: no output tensor
    assert set(ours) == set(ref) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert torch.allclose(tensor, ref[name], atol=1e-6), name


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sharded_safetensors_round_trip(tiny_model_factory, arch):
    from tests.conftest import load_hf_model

    path = tiny_model_factory(arch)
    assert len(list(path.glob("*.safetensors"))) > 1  # really sharded
    ref = load_hf_model(path).state_dict()
    source = resolve_model_source(str(path))
    ours = dict(iterate_weights(source, load_config(source)))
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name
    assert set(ref) - set(ours) <= {"lm_head.weight"}


def test_bad_path_says_what_was_expected(tmp_path):
    for bad in ("/no/such/model", str(tmp_path), "NotAPackagedModel"):
        with pytest.raises(ValueError, match="config.json.*gguf.*SmolLM2-135M-Instruct"):
            resolve_model_source(bad)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config

    config = GPT2Config()
    with pytest.raises(ValueError, match="GPT2LMHeadModel|gpt2"):
        get_model_class(config)
    assert "LlamaForCausalLM" in supported_architectures()


def test_packaged_model_config_tokenizer_eos():
    source = resolve_model_source("SmolLM2-135M-Instruct")
    assert source.kind == "gguf" and source.path.is_file()
    config = load_config(source)
    tok = load_tokenizer(source)
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert 2 in get_eos_token_ids(source, config, tok)  # <|im_end|>
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"


def test_dummy_weights_need_no_weight_files(tiny_model_factory, tmp_path):
    import shutil

    from radixserve.model_loader.loader import load_model

    shutil.copy(tiny_model_factory("qwen2") / "config.json", tmp_path / "config.json")
    source = resolve_model_source(str(tmp_path))
    config = load_config(source)
    model = load_model(source, config, torch.bfloat16, torch.device("cpu"), load_format="dummy")
    params = dict(model.named_parameters())
    assert params["model.layers.0.self_attn.qkv_proj.weight"].dtype == torch.bfloat16
    assert params["model.layers.0.self_attn.qkv_proj.weight"].abs().max() <= 1e-3
    with pytest.raises(ValueError, match="safetensors"):
        load_model(source, config, torch.float32, torch.device("cpu"))
