"""Weights of a GGUF file, dequantized and renamed to Hugging Face names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

import gguf
import numpy as np
import torch

# GGUF tensor name (without "blk.N.") -> HF name (without "model.layers.N.")
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# llama.cpp's converter permutes q/k rows of these families for its rotary layout.
PERMUTED_FAMILIES = {"llama", "mistral"}
LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> Optional[str]:
    m = LAYER_RE.match(gguf_name)
    if m:
        layer, piece, kind = m.groups()
        return f"model.layers.{layer}.{LAYER_NAMES[piece]}.{kind}" if piece in LAYER_NAMES else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{GLOBAL_NAMES[base]}.{kind}" if base in GLOBAL_NAMES else None


def unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of the converter's permutation: within each head the rows were
    reordered from [half0, half1] to interleaved pairs; put them back."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def count_gguf_tensors(path: Path) -> int:
    return len(gguf.GGUFReader(str(path)).tensors)


def iterate_gguf_weights(path: Path, config: Any) -> Iterator[Tuple[str, torch.Tensor]]:
    reader = gguf.GGUFReader(str(path))
    permute = getattr(config, "model_type", "") in PERMUTED_FAMILIES
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise ValueError(f"GGUF tensor {tensor.name!r} has no known Hugging Face name")
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        w = torch.from_numpy(np.array(data, dtype=np.float32))  # a writable copy
        if permute and name.endswith("q_proj.weight"):
            w = unpermute_rows(w, config.num_attention_heads)
        elif permute and name.endswith("k_proj.weight"):
            w = unpermute_rows(w, kv_heads)
        yield name, w
