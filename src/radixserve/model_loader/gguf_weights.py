"""Weights of a GGUF file, dequantized to float32 and renamed to Hugging Face names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import gguf
import numpy as np
import torch

# GGUF tensor name (without "blk.N.") -> HF module name (without "model.layers.N.")
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
# Tensors that are not parameters of an HF model: llama.cpp stores Llama 3's rope
# frequency factors as a tensor, our rotary layer computes them from the config.
SKIPPED = {"rope_freqs.weight"}
# llama.cpp's converter permutes q/k rows of these architectures so that its
# rotary kernel sees (x0, x1) pairs adjacent; HF keeps the two halves apart.
PERMUTED_ARCHS = {"llama", "mistral"}
LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> Optional[str]:
    """The HF parameter name of a GGUF tensor, or None when there is none."""
    m = LAYER_RE.match(gguf_name)
    if m:
        layer, piece, kind = m.groups()
        return f"model.layers.{layer}.{LAYER_NAMES[piece]}.{kind}" if piece in LAYER_NAMES else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{GLOBAL_NAMES[base]}.{kind}" if base in GLOBAL_NAMES and kind in ("weight", "bias") else None


def unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of the converter's permutation: within each head, rows were
    reordered from [first half, second half] to interleaved pairs; undo it."""
    rows = w.shape[0]
    per_head = rows // num_heads
    return w.reshape(num_heads, per_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


class GGUFWeights:
    """The tensors of one GGUF file as (hf_name, float32 tensor), with a length
    so a progress bar knows the total without parsing the file twice (opening a
    GGUF parses its whole vocabulary: seconds)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.reader = gguf.GGUFReader(str(self.path))
        self.arch = str(_field(self.reader, "general.architecture"))
        # Head counts come from the file itself: they are what the converter
        # permuted with, whatever config the caller has.
        self.num_heads = int(_field(self.reader, f"{self.arch}.attention.head_count") or 0)
        self.num_kv_heads = int(_field(self.reader, f"{self.arch}.attention.head_count_kv") or self.num_heads)

    def __len__(self) -> int:
        return sum(1 for t in self.reader.tensors if t.name not in SKIPPED)

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        permuted = self.arch in PERMUTED_ARCHS
        for tensor in self.reader.tensors:
            if tensor.name in SKIPPED:
                continue
            name = hf_name(tensor.name)
            if name is None:
                raise ValueError(f"{self.path.name}: GGUF tensor {tensor.name!r} has no known Hugging Face name")
            w = _dequantize(tensor)
            if permuted and name.endswith("q_proj.weight"):
                w = unpermute_rows(w, self.num_heads)
            elif permuted and name.endswith("k_proj.weight"):
                w = unpermute_rows(w, self.num_kv_heads)
            yield name, w


def _dequantize(tensor: Any) -> torch.Tensor:
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # F32 comes back as a read-only view of the memory map: copy it, since
    # torch.from_numpy wants a writable array and the map may be closed later.
    if data.dtype != np.float32 or not data.flags.writeable:
        data = data.astype(np.float32)
    # GGUF lists dimensions innermost first; HF (row-major) wants them reversed.
    hf_shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return torch.from_numpy(data.reshape(hf_shape))


def projection_block_types(path: Path) -> List[str]:
    """The GGUF block types of the file's 2-D layer weights (e.g. ["Q4_1"]):
    what the file's projections are quantized as, sorted."""
    reader = gguf.GGUFReader(str(path))
    return sorted({t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2})


def iterate_gguf_weights(path: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    return iter(GGUFWeights(path))
