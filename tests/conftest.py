"""Shared fixtures: tiny random-weight models built with transformers from real
configs, saved as safetensors next to the embedded model's tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, i.e. at import: set it before
    # any test imports a kernel module, so Triton kernels run on the CPU
    # interpreter. Engine subprocesses inherit it harmlessly (they use torch ops on CPU).
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
)


def tiny_config(arch: str, vocab_size: int, bos: int, eos: int):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    ids = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos)
    if arch == "llama":
        # Llama 3 style rope scaling, untied embeddings.
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=64)
        return LlamaConfig(**TINY_COMMON, **ids, rope_parameters=rope, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**TINY_COMMON, **ids, tie_word_embeddings=True,
                           rope_parameters=dict(rope_type="default", rope_theta=1000000.0))
    if arch == "qwen3":
        return Qwen3Config(**TINY_COMMON, **ids, head_dim=32, tie_word_embeddings=False,
                           rope_parameters=dict(rope_type="default", rope_theta=1000000.0))
    raise ValueError(arch)


@pytest.fixture(scope="session")
def embedded_tokenizer_dir(tmp_path_factory) -> Path:
    """The default model's tokenizer, saved once in HF format for tiny models.
    RADIXSERVE_TEST_TOKENIZER_DIR names a folder holding it instead, for
    machines without the packaged model (the GPU machine)."""
    if os.environ.get("RADIXSERVE_TEST_TOKENIZER_DIR"):
        return Path(os.environ["RADIXSERVE_TEST_TOKENIZER_DIR"])
    from radixserve.model_loader.source import resolve_model_source
    from radixserve.utils.hf_utils import load_tokenizer

    tok = load_tokenizer(resolve_model_source("SmolLM2-135M-Instruct"))
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


def build_tiny_model(arch: str, tokenizer_dir: Path, out_dir: Path) -> Path:
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config(arch, len(tok), bos=tok.bos_token_id or 1, eos=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, max_shard_size="2MB")  # sharded, as big checkpoints are
    for f in os.listdir(tokenizer_dir):
        shutil.copy(tokenizer_dir / f, out_dir / f)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_factory(embedded_tokenizer_dir, tmp_path_factory):
    built = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, embedded_tokenizer_dir, tmp_path_factory.mktemp(arch))
        return built[arch]

    return get


def load_hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(hf_model, prompts, new_tokens: int) -> list:
    """transformers' greedy continuation of each prompt, exactly new_tokens long."""
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        y = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        outs.append(y[0, len(ids):].tolist())
    return outs


@pytest.fixture(scope="session")
def default_server() -> str:
    """One HTTP server of the packaged default model (SmolLM2-135M-Instruct)
    for every module that asks the real model something: its start-up is the
    cost, so the session pays it once. Yields the base URL."""
    from tests.server_utils import running_server

    with running_server("SmolLM2-135M-Instruct") as (_, base):
        yield base


def assert_no_leak(engine) -> None:
    kv = engine.get_server_info()["kv_cache"]
    assert kv["in_use_tokens"] == 0, kv
    assert kv["total_tokens"] == kv["free_tokens"] + kv["in_use_tokens"] + kv["cached_tokens"], kv


def assert_draft_kv_balanced(engine) -> dict:
    """A speculative engine's draft pool: every slot free, a request's own or
    in the draft's prefix tree (a request's own are freed, or join the tree,
    with its KV). Returns the counts."""
    kv = engine.get_server_info()["speculative"]["draft_kv"]
    assert kv["total_tokens"] == kv["free_tokens"] + kv["in_use_tokens"] + kv["cached_tokens"], kv
    return kv


def generate_then_abort(engine, input_ids, rid: str, max_new_tokens: int = 400) -> dict:
    """A long greedy generation aborted once it runs; returns its result."""
    import threading
    import time

    results = {}

    def run():
        results["out"] = engine.generate(input_ids=input_ids, rid=rid, sampling_params={
            "temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True})

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 30
    while engine.get_server_info()["num_running_reqs"] == 0 and time.time() < deadline:
        time.sleep(0.01)
    engine.abort_request(rid)
    thread.join(timeout=30)
    return results["out"]


def write_eagle_head(target: Path, out: Path, seed: int = 0, std: float = 0.1) -> Path:
    """A random EAGLE-1/2 head for `target` in the EAGLE authors' layout: one
    transformers LlamaDecoderLayer (its weights under `layers.0.`, without the
    input norm the head skips), `fc` (2H -> H, with bias), and a copy of an
    embedding that the server must ignore (it uses the target's)."""
    import json

    from safetensors.torch import save_file
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig.from_pretrained(target)
    config.num_hidden_layers, config.architectures = 1, ["LlamaForCausalLMEagle"]
    torch.manual_seed(seed)
    layer = LlamaDecoderLayer(config, 0)
    fc = torch.nn.Linear(2 * config.hidden_size, config.hidden_size)
    for p in list(layer.parameters()) + list(fc.parameters()):
        torch.nn.init.normal_(p, std=std)
    tensors = {f"layers.0.{k}": v for k, v in layer.state_dict().items() if not k.startswith("input_layernorm.")}
    tensors.update({"fc.weight": fc.weight, "fc.bias": fc.bias,
                    "embed_tokens.weight": torch.randn(config.vocab_size, config.hidden_size)})
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    return out
