"""Weights of a GGUF file, dequantized to float32 and renamed to Hugging Face names."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import gguf
import numpy as np
import torch
from gguf.quants import quant_shape_to_byte_shape

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


# GGML types stored as plain numpy arrays (the rest are blocks of bytes)
_PLAIN_TYPES = {
    gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
    gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
    gguf.GGMLQuantizationType.I64: np.int64,
}


@dataclass
class GGUFTensorInfo:
    name: str
    ggml_type: int  # a gguf.GGMLQuantizationType value
    dims: List[int]  # GGUF order: innermost dimension first
    offset: int  # of the tensor's data, from the start of the file


@dataclass
class GGUFIndex:
    """What loading needs from a GGUF's header: its architecture, head counts
    and where each tensor lies. Reading the header with the gguf package
    parses the whole vocabulary (seconds), so the index is saved with the
    cached config (utils/hf_utils.py) and later starts read the tensors
    straight from a memory map of the file."""

    arch: str
    num_heads: int
    num_kv_heads: int
    tensors: List[GGUFTensorInfo]

    @classmethod
    def parse(cls, path: Path) -> "GGUFIndex":
        reader = gguf.GGUFReader(str(path))
        arch = str(_field(reader, "general.architecture"))
        # Head counts come from the file itself: they are what the converter
        # permuted with, whatever config the caller has.
        num_heads = int(_field(reader, f"{arch}.attention.head_count") or 0)
        num_kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv") or num_heads)
        tensors = [GGUFTensorInfo(t.name, int(t.tensor_type), [int(d) for d in t.shape], int(t.data_offset))
                   for t in reader.tensors]
        return cls(arch, num_heads, num_kv_heads, tensors)

    def save_pretrained(self, folder: Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / INDEX_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def from_pretrained(cls, folder: Path) -> "GGUFIndex":
        saved = json.loads((Path(folder) / INDEX_FILE).read_text())
        return cls(**{**saved, "tensors": [GGUFTensorInfo(**t) for t in saved["tensors"]]})


INDEX_FILE = "gguf_index.json"


def load_gguf_index(path: Path) -> GGUFIndex:
    """The file's index, parsed once per file (and transformers version)."""
    from radixserve.utils.hf_utils import cached_from_gguf

    return cached_from_gguf(Path(path), "tensors", GGUFIndex.from_pretrained, lambda: GGUFIndex.parse(path))


class GGUFWeights:
    """The tensors of one GGUF file as (hf_name, float32 tensor), with a length
    for a progress bar."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.index = load_gguf_index(self.path)
        self.file = np.memmap(self.path, mode="r")

    def __len__(self) -> int:
        return sum(1 for t in self.index.tensors if t.name not in SKIPPED)

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        index = self.index
        permuted = index.arch in PERMUTED_ARCHS
        for tensor in index.tensors:
            if tensor.name in SKIPPED:
                continue
            name = hf_name(tensor.name)
            if name is None:
                raise ValueError(f"{self.path.name}: GGUF tensor {tensor.name!r} has no known Hugging Face name")
            w = _dequantize(self.file, tensor)
            if permuted and name.endswith("q_proj.weight"):
                w = unpermute_rows(w, index.num_heads)
            elif permuted and name.endswith("k_proj.weight"):
                w = unpermute_rows(w, index.num_kv_heads)
            yield name, w


def _dequantize(file: np.ndarray, tensor: GGUFTensorInfo) -> torch.Tensor:
    qtype = gguf.GGMLQuantizationType(tensor.ggml_type)
    # GGUF lists dimensions innermost first; HF (row-major) wants them reversed.
    hf_shape = tuple(reversed(tensor.dims))
    count = int(np.prod(hf_shape))
    if qtype in _PLAIN_TYPES:
        item = np.dtype(_PLAIN_TYPES[qtype])
        raw = file[tensor.offset:tensor.offset + count * item.itemsize].view(item).reshape(hf_shape)
    else:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        raw = file[tensor.offset:tensor.offset + count // block_size * type_size]
        raw = raw.reshape(quant_shape_to_byte_shape(hf_shape, qtype))
    data = gguf.quants.dequantize(raw, qtype)
    # F32 comes back as a read-only view of the memory map: copy it, since
    # torch.from_numpy wants a writable array and the map may be closed later.
    if data.dtype != np.float32 or not data.flags.writeable:
        data = data.astype(np.float32)
    return torch.from_numpy(data.reshape(hf_shape))


def projection_block_types(path: Path) -> List[str]:
    """The GGUF block types of the file's 2-D layer weights (e.g. ["Q4_1"]):
    what the file's projections are quantized as, sorted."""
    return sorted({gguf.GGMLQuantizationType(t.ggml_type).name for t in load_gguf_index(path).tensors
                   if t.name.startswith("blk.") and len(t.dims) == 2})


def iterate_gguf_weights(path: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    return iter(GGUFWeights(path))
