"""An EAGLE-3 draft head's layer in one C++ call on a CPU with AMX or AVX-512
BF16 (radixserve_eagle3_layer in layers/cpu_decode_layers.cpp).

A draft step of the default model's head at batch 1 took about 0.9 ms on a
2-core Xeon, of which the int8 products were about 0.3: the rest was the
Python between a dozen small kernels (norms, the concatenation, rotary,
attention, adds) while the second OpenMP thread waited. The fused call runs
the same kernels in the same order, so its output is the eager head's bit for
bit; the token embedding (the target's), the final norm and the LM head stay
in Python.

It takes a head whose linears the CPU quantized to int8 (fc, q|k|v, o,
gate|up, down; no LoRA, one rank), bfloat16 norms, and a batch of decode
queries the eager linears would also multiply on a C++ int8 kernel
(cpu_decode_layers.decode_queries_on_kernels): a draft decode step, or a catch-up
extend of a few tokens over the request's earlier entries. A new request's
first extend (its whole prompt) runs eagerly. ModelRunner calls forget()
whenever weights or pools change, as for CpuDecodeLayers.
"""

from __future__ import annotations

import ctypes
from typing import Any, Optional

import torch

from radixserve.layers import cpu_kernels, cpu_quantized_paths, quantization
from radixserve.model_executor.cpu_decode_layers import (
    DecodeShape, decode_batch, decode_queries_on_kernels, i64, ptr, quantized_for_kernels, set_pool_strides)


class Int8Weight(ctypes.Structure):
    _fields_ = [("packed", ptr), ("scales", ptr), ("n", i64), ("k", i64), ("vnni", i64)]


class Eagle3Layer(ctypes.Structure):
    _fields_ = [("input_norm", ptr), ("hidden_norm", ptr), ("post_attention_norm", ptr), ("fc", Int8Weight),
                ("qkv", Int8Weight), ("o", Int8Weight), ("gate_up", Int8Weight), ("down", Int8Weight),
                ("k_buf", ptr), ("v_buf", ptr)]


def _int8_struct(linear: Any) -> Int8Weight:
    """An int8 Linear's packed copy (made now if need be) and scales: the VNNI
    kernel's layout where the eager linears take that kernel (no AMX, VNNI),
    else the AMX one (for the AMX or AVX-512 BF16 kernel)."""
    vnni = not cpu_kernels.amx_available() and cpu_kernels.avx512_vnni_available()
    if vnni:
        copy = cpu_quantized_paths.vnni_copy(linear.weight)
    else:
        copy = cpu_quantized_paths.amx_copy(linear.weight, lambda: cpu_kernels.pack_int8_for_amx(linear.weight))
    return Int8Weight(copy.data_ptr(), linear.weight_scale.data_ptr(), linear.out_features, linear.in_features,
                      int(vnni))


class CpuEagle3Layer:
    """An EAGLE-3 head's layer for CPU draft steps (see the module's doc)."""

    def __init__(self, head: Any) -> None:
        self.head = head
        layer = head.midlayer
        attn, mlp = layer.self_attn, layer.mlp
        self.linears = (head.fc, attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        self.shape = DecodeShape(
            hidden=head.config.hidden_size, heads=attn.num_heads, kv_heads=attn.num_kv_heads, head_dim=attn.head_dim,
            intermediate=mlp.down_proj.in_features, eps=layer.input_layernorm.eps, scale=attn.attn.scaling)
        self.qkv_width = attn.qkv_proj.out_features
        self._struct: Optional[Eagle3Layer] = None  # built on first use (forget)

    @classmethod
    def for_model(cls, model: Any, device: torch.device, dtype: torch.dtype, lora: Any) -> Optional["CpuEagle3Layer"]:
        """The fused layer for an EAGLE-3 head, or None where it does not qualify."""
        from radixserve.models.llama_eagle3 import LlamaForCausalLMEagle3

        if type(model) is not LlamaForCausalLMEagle3 or device.type != "cpu" or dtype != torch.bfloat16 \
                or lora is not None or not cpu_kernels.quantized_kernels_available():
            return None
        layer = model.midlayer
        norms = (layer.input_layernorm, layer.hidden_norm, layer.post_attention_layernorm)
        attn = layer.self_attn
        fits = (all(quantized_for_kernels(m, quantization.int8_weight_only_linear, torch.float32)
                    for m in (model.fc, attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj))
                and attn.o_proj.tp_group.world_size == 1 and attn.attn.sliding_window in (None, 0)
                and all(n.weight.dtype == torch.bfloat16 and n.eps == norms[0].eps for n in norms))
        return cls(model) if fits else None

    def takes(self, fb: Any) -> bool:
        """Whether this batch runs here rather than eagerly (decode queries a
        C++ int8 kernel multiplies: cpu_quantized_paths.int8_rows_on_kernel)."""
        return fb.spec_hidden is not None and decode_queries_on_kernels(fb, cpu_quantized_paths.int8_rows_on_kernel)

    def forward(self, fb: Any) -> torch.Tensor:
        """The layer's output [rows, hidden] (before the final norm), as the
        head's forward returns it, for a batch it takes."""
        hidden = self.shape.hidden
        features = fb.spec_hidden.to(torch.bfloat16)
        if features.stride(-1) != 1:
            features = features.contiguous()
        embeds = self.head.embed(fb.input_ids).to(torch.bfloat16).contiguous()
        rows = embeds.shape[0]
        out = torch.empty(rows, hidden, dtype=torch.bfloat16)
        s = self.shape
        widths = 4 * hidden + self.qkv_width + (s.heads + s.kv_heads) * s.head_dim + s.heads * s.head_dim \
            + 3 * s.intermediate  # [norm(embeds) ; norm(hidden)], normed, q|k|v, q|k, attention, hidden, gate|up, act
        scratch = torch.empty(rows * widths, dtype=torch.bfloat16)
        batch, _alive = decode_batch(fb)  # (_alive: the tensors batch points into)
        status = cpu_kernels.eagle3_layer(ctypes.byref(self.shape), ctypes.byref(self._layer(fb)),
                                          ctypes.byref(batch), embeds, features, out, scratch)
        if status != 0:
            raise RuntimeError("the fused EAGLE-3 layer: this CPU or process has no AMX or AVX-512 BF16")
        return out

    def forget(self) -> None:
        """Drop the struct: its addresses are stale once weights are updated or
        the pool is released or resumed (ModelRunner calls this)."""
        self._struct = None

    def _layer(self, fb: Any) -> Eagle3Layer:
        if self._struct is None:
            pool = fb.kv_pool
            set_pool_strides(self.shape, pool, self.head.rotary_emb)
            layer = self.head.midlayer
            self._struct = Eagle3Layer(
                layer.input_layernorm.weight.data_ptr(), layer.hidden_norm.weight.data_ptr(),
                layer.post_attention_layernorm.weight.data_ptr(), *map(_int8_struct, self.linears),
                pool.k_buffers[0].data_ptr(), pool.v_buffers[0].data_ptr())
        return self._struct
