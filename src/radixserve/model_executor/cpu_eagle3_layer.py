"""An EAGLE-3 draft head's layer in one C++ call on a CPU with AMX or AVX-512
BF16 (radixserve_eagle3_layer in layers/cpu_decode_layers.cpp).

A draft step of the default model's head at batch 1 took about 0.9 ms on a
2-core Xeon, of which the int8 products were about 0.3: the rest was the
Python between a dozen small kernels (norms, the concatenation, rotary,
attention, adds) while the second OpenMP thread waited. The fused call runs
the same kernels in the same order, so its output is the eager head's bit for
bit; the token embedding (the target's), the final norm and the LM head stay
in Python.

`chain` goes further for a greedy chain of draft steps (top-1): the catch-up
extend, every later step, the final norm, the LM head, the first largest
logit and the map to the target's ids in one call (radixserve_eagle3_chain).
The Python around three draft forwards (batches, metadata, the norm and LM
head calls, argmax and host copies) took about 1.4 ms of a 2.0 ms draft on a
2-core Zen 4, against 0.6 ms of kernels.

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
    DecodeBatch, DecodeShape, attention_on_kernels, decode_batch, decode_queries_on_kernels, i64, ptr,
    quantized_for_kernels, set_pool_strides)


class Int8Weight(ctypes.Structure):
    _fields_ = [("packed", ptr), ("scales", ptr), ("n", i64), ("k", i64), ("vnni", i64)]


class Eagle3Layer(ctypes.Structure):
    _fields_ = [("input_norm", ptr), ("hidden_norm", ptr), ("post_attention_norm", ptr), ("fc", Int8Weight),
                ("qkv", Int8Weight), ("o", Int8Weight), ("gate_up", Int8Weight), ("down", Int8Weight),
                ("k_buf", ptr), ("v_buf", ptr)]


class Eagle3Head(ctypes.Structure):
    _fields_ = [("norm", ptr), ("lm_head", Int8Weight), ("draft_to_target", ptr), ("embed", ptr)]


def _int8_struct(weight: torch.Tensor, scale: torch.Tensor) -> Int8Weight:
    """An int8 weight's packed copy (made now if need be) and scales: the VNNI
    kernel's layout where the eager linears take that kernel (no AMX, VNNI),
    else the AMX one (for the AMX or AVX-512 BF16 kernel)."""
    vnni = not cpu_kernels.amx_available() and cpu_kernels.avx512_vnni_available()
    if vnni:
        copy = cpu_quantized_paths.vnni_copy(weight)
    else:
        copy = cpu_quantized_paths.amx_copy(weight, lambda: cpu_kernels.pack_int8_for_amx(weight))
    return Int8Weight(copy.data_ptr(), scale.data_ptr(), weight.shape[0], weight.shape[1], int(vnni))


def _linear_struct(linear: Any) -> Int8Weight:
    return _int8_struct(linear.weight, linear.weight_scale)


def head_fits_chain(head: Any) -> bool:
    """Whether the parts a chain adds to the layer are in the formats
    radixserve_eagle3_chain reads: an int8 LM head on the int8 kernels
    (float32 scales, 32-wide blocks, one rank), a bfloat16 final norm of the
    layer's eps, and the target's bfloat16 embedding on one rank."""
    lm_head, embed = head.lm_head, head.embed
    return (getattr(lm_head, "weight_format", None) is not None
            and lm_head.weight_format.matmul is quantization.int8_weight_only_linear
            and lm_head.tp_group.world_size == 1 and lm_head.qscale.dtype == torch.float32
            and lm_head.qscale.is_contiguous() and lm_head.qweight.is_contiguous()
            and lm_head.qweight.shape[0] % cpu_kernels.AMX_BLOCK == 0
            and head.norm.weight.dtype == torch.bfloat16 and head.norm.eps == head.midlayer.input_layernorm.eps
            and getattr(embed, "tp_group", None) is not None and embed.tp_group.world_size == 1
            and embed.weight.dtype == torch.bfloat16 and embed.weight.is_contiguous()
            and head.d2t.is_contiguous())


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
        self._head: Optional[Eagle3Head] = None  # the same, for chains

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
        status = cpu_kernels.eagle3_layer(ctypes.byref(self.shape), ctypes.byref(self._layer(fb.kv_pool)),
                                          ctypes.byref(batch), embeds, features, out, scratch)
        if status != 0:
            raise RuntimeError("the fused EAGLE-3 layer: this CPU or process has no AMX or AVX-512 BF16")
        return out

    def takes_chain(self, attn_backend: Any, pool: Any, rows: int, chains: int) -> bool:
        """Whether a greedy chain whose catch-up extend has `rows` rows (decode
        queries over earlier entries) for `chains` requests runs in one call:
        where both batches would take this layer (as takes) and the head
        fits (head_fits_chain)."""
        return (attention_on_kernels(attn_backend, pool) and cpu_quantized_paths.int8_rows_on_kernel(rows, True)
                and cpu_quantized_paths.int8_rows_on_kernel(chains, True) and head_fits_chain(self.head))

    def chain(self, pool: Any, batches: List[DecodeBatch], ids: torch.Tensor, features: torch.Tensor,
              last_rows: torch.Tensor) -> torch.Tensor:
        """Target token ids [chains, steps] of a greedy chain (takes_chain):
        batches[0] the catch-up extend (ids [rows] the tokens it reads,
        features [rows, 3 hidden] the target's), last_rows [chains] each
        request's last row there; batches[s] draft step s + 1, one row a request."""
        tokens = torch.empty(len(last_rows), len(batches), dtype=torch.int64)
        status = cpu_kernels.eagle3_chain(
            ctypes.byref(self.shape), ctypes.byref(self._layer(pool)), ctypes.byref(self._head_struct()),
            (DecodeBatch * len(batches))(*batches), ids, features.to(torch.bfloat16).contiguous(), last_rows, tokens)
        if status != 0:
            raise RuntimeError("the fused EAGLE-3 chain: this CPU or process has no AMX or AVX-512 BF16")
        return tokens

    def forget(self) -> None:
        """Drop the struct: its addresses are stale once weights are updated or
        the pool is released or resumed (ModelRunner calls this)."""
        self._struct = self._head = None

    def _layer(self, pool: Any) -> Eagle3Layer:
        if self._struct is None:
            set_pool_strides(self.shape, pool, self.head.rotary_emb)
            layer = self.head.midlayer
            self._struct = Eagle3Layer(
                layer.input_layernorm.weight.data_ptr(), layer.hidden_norm.weight.data_ptr(),
                layer.post_attention_layernorm.weight.data_ptr(), *map(_linear_struct, self.linears),
                pool.k_buffers[0].data_ptr(), pool.v_buffers[0].data_ptr())
        return self._struct

    def _head_struct(self) -> Eagle3Head:
        head = self.head
        if self._head is None:
            self._head = Eagle3Head(head.norm.weight.data_ptr(),
                                    _int8_struct(head.lm_head.qweight, head.lm_head.qscale), head.d2t.data_ptr())
        # The embedding is the target's, whose weight updates do not reach this runner's forget(): read anew.
        self._head.embed = head.embed.weight.data_ptr()
        return self._head
