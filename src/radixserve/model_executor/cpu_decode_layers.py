"""A CPU decode step's decoder layers in one C++ call (layers/cpu_decode_layers.cpp).

On a CPU with AMX or AVX-512 BF16, a decode batch of the default model runs
every layer as a chain of fused kernels (RMSNorm, the int4 linears on AMX or
AVX-512 BF16, rotary, paged decode attention, SiLU-and-mul), called one by one
from Python. At 32 requests on a
2-core Xeon, about a third of the step was that Python (module calls, checks,
ctypes), and the second OpenMP thread idled through it. `CpuDecodeLayers`
calls the same kernels in the same order from C++, so its outputs are the
eager path's bit for bit; the embedding, the final norm, the LM head and
sampling stay in Python.

It takes a model only where every layer is the plain Llama block (RMSNorm,
no biases, no q/k norms, no attention sinks, standard rotary from a table)
with int4 weights, one tensor-parallel rank, no LoRA, a bfloat16 KV pool and
the torch-native attention backend; a batch only where the eager path would
take a C++ int4 kernel (cpu_quantized_paths.int4_rows_on_kernel: on AMX 1 to 64
decode rows, without it 1 to 127; or a speculative verify of as many tokens,
each a decode query over its own slots). Anything else runs eagerly. The C++
side gets raw addresses (weights, their packed copies, the
KV buffers), kept in structs until ModelRunner, which makes every weight
update and pool release or resume, calls forget().
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable, List, Optional, Tuple

import torch

from radixserve.layers import cpu_kernels, cpu_quantized_paths, quantization
from radixserve.layers.attention.torch_native import TorchNativeAttnBackend

i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


class Int4Weight(ctypes.Structure):
    _fields_ = [("packed", ptr), ("scales_zeros", ptr), ("n", i64), ("k", i64), ("group", i64)]


class DecodeLayer(ctypes.Structure):
    _fields_ = [("input_norm", ptr), ("post_attention_norm", ptr), ("qkv", Int4Weight), ("o", Int4Weight),
                ("gate_up", Int4Weight), ("down", Int4Weight), ("k_buf", ptr), ("v_buf", ptr), ("window", i64)]


class DecodeShape(ctypes.Structure):
    _fields_ = [("hidden", i64), ("heads", i64), ("kv_heads", i64), ("head_dim", i64), ("intermediate", i64),
                ("k_slot_stride", i64), ("k_head_stride", i64), ("v_slot_stride", i64), ("v_head_stride", i64),
                ("eps", f32), ("scale", f32), ("rope_table", ptr)]


class DecodeBatch(ctypes.Structure):
    _fields_ = [("rows", i64), ("positions", ptr), ("slots", ptr), ("slots_row_stride", i64), ("seq_lens", ptr),
                ("new_slots", ptr), ("capture", ptr), ("num_capture", i64), ("aux", ptr), ("aux_stride", i64)]


def _int4_struct(linear: Any) -> Int4Weight:
    """An int4 Linear's packed copy (made now if need be) and scales."""
    copy, scales = quantization.int4_amx_copy(linear.weight), linear.weight_scale
    return Int4Weight(copy.data_ptr(), scales.data_ptr(), linear.out_features, linear.in_features,
                      linear.in_features // scales.shape[0])


def quantized_for_kernels(linear: Any, matmul: Any, scale_dtype: torch.dtype) -> bool:
    """Whether a Linear's weight is in the format `matmul` multiplies (with
    contiguous scales of scale_dtype), shaped for the C++ kernels' 32-wide
    blocks, with no bias or LoRA: what the fused C++ layers read."""
    fmt = getattr(linear, "weight_format", None)
    return (fmt is not None and fmt.matmul is matmul and linear.bias is None
            and getattr(linear, "lora", None) is None and linear.weight_scale.dtype == scale_dtype
            and linear.weight_scale.is_contiguous() and linear.in_features % cpu_kernels.AMX_BLOCK == 0
            and linear.out_features % cpu_kernels.AMX_BLOCK == 0)


def _is_int4(linear: Any) -> bool:
    return (quantized_for_kernels(linear, quantization.int4_weight_only_linear, torch.bfloat16)
            and linear.weight_scale.shape[0] > 0
            and (linear.in_features // linear.weight_scale.shape[0]) % cpu_kernels.AMX_BLOCK == 0)


def _plain_llama_layer(layer: Any) -> bool:
    from radixserve.models.llama import DecoderLayer, LlamaAttention, LlamaMLP

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (type(layer) is DecoderLayer and type(attn) is LlamaAttention and type(mlp) is LlamaMLP
            and attn.q_norm is None and attn.attn.sinks is None
            and all(_is_int4(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
            and attn.o_proj.tp_group.world_size == 1
            and layer.input_layernorm.weight.dtype == torch.bfloat16)


class CpuDecodeLayers:
    """The decoder layers of one model for CPU decode batches (see the module's doc)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        layers = model.model.layers
        attn, mlp = layers[0].self_attn, layers[0].mlp
        self.linears = [(l.self_attn.qkv_proj, l.self_attn.o_proj, l.mlp.gate_up_proj, l.mlp.down_proj)
                        for l in layers]
        self.intermediate = mlp.down_proj.in_features
        self.shape = DecodeShape(
            hidden=layers[0].input_layernorm.weight.shape[0], heads=attn.num_heads, kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim, intermediate=self.intermediate, eps=layers[0].input_layernorm.eps,
            scale=attn.attn.scaling)
        self.rotary = attn.rotary_emb  # its cos | sin table, shared by every layer (for_model)
        self.q_width, self.kv_width = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        self._structs: Optional[ctypes.Array] = None  # built on first use (forget)

    @classmethod
    def for_model(cls, model: Any, device: torch.device, dtype: torch.dtype, lora: Any) -> Optional["CpuDecodeLayers"]:
        """The fused layers for this model, or None where it does not qualify."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if device.type != "cpu" or dtype != torch.bfloat16 or lora is not None or not layers \
                or not cpu_kernels.quantized_kernels_available() or not all(_plain_llama_layer(l) for l in layers):
            return None
        rotaries = {id(l.self_attn.rotary_emb) for l in layers}
        return cls(model) if len(rotaries) == 1 else None

    def takes(self, fb: Any) -> bool:
        """Whether this batch runs here rather than eagerly: a decode batch, or a
        speculative verify (an extend of a few tokens a request, each attending
        as a decode query: short_extend_rows) that the eager layers would also
        multiply on a C++ int4 kernel (cpu_quantized_paths.int4_rows_on_kernel)."""
        return decode_queries_on_kernels(fb, cpu_quantized_paths.int4_rows_on_kernel)

    @staticmethod
    def takes_decode_rows(count: int) -> bool:
        """Whether a decode step or verify of `count` rows (queries) runs here (as takes)."""
        return cpu_quantized_paths.int4_rows_on_kernel(count, True)

    def forward(self, fb: Any) -> torch.Tensor:
        """The final-normed hidden states [rows, hidden] of a batch it takes
        (takes(fb)), and fb.aux_hidden where fb.capture_aux_layers asks for it."""
        hidden = self.model.model.embed_tokens(fb.input_ids).to(torch.bfloat16).contiguous()
        rows = hidden.shape[0]
        residual = torch.empty_like(hidden)
        widths = self.shape.hidden + (self.q_width + 2 * self.kv_width) + (self.q_width + self.kv_width) \
            + self.q_width + 3 * self.intermediate  # normed, q|k|v, q|k, attention, gate|up, SiLU * up
        scratch = torch.empty(rows * widths, dtype=torch.bfloat16)
        layers = self._layers(fb)
        capture = list(fb.capture_aux_layers or ())
        batch, _alive = decode_batch(fb)  # (_alive: the tensors batch points into)
        if capture:  # the captured layers' columns side by side, as run_decoder concatenates them
            aux = torch.empty(rows, len(capture) * self.shape.hidden, dtype=torch.bfloat16)
            capture_ids = torch.tensor(capture, dtype=torch.int64)
            batch.capture, batch.num_capture = capture_ids.data_ptr(), len(capture)
            batch.aux, batch.aux_stride = aux.data_ptr(), aux.stride(0)
        status = cpu_kernels.decode_layers(ctypes.byref(self.shape), layers, len(layers), ctypes.byref(batch),
                                           hidden, residual, scratch)
        if status != 0:
            raise RuntimeError("the fused CPU decode layers: this CPU or process has no AMX or AVX-512 BF16")
        out, _ = self.model.model.norm(hidden, residual)
        if capture:
            for j, layer in enumerate(capture):
                if layer == len(layers):  # the final-normed output (an EAGLE-1/2 head's input)
                    aux[:, j * self.shape.hidden:(j + 1) * self.shape.hidden] = out
            fb.aux_hidden = aux
        return out

    def forget(self) -> None:
        """Drop the structs: their addresses are stale once weights are updated
        (which drops the packed copies) or the KV pool is released or resumed.
        ModelRunner calls this after each such change; the next step rebuilds."""
        self._structs = None

    def _layers(self, fb: Any) -> ctypes.Array:
        if self._structs is None:
            self._structs = self._build_layers(fb.kv_pool)
        return self._structs

    def _build_layers(self, pool: Any) -> ctypes.Array:
        set_pool_strides(self.shape, pool, self.rotary)
        structs: List[DecodeLayer] = []
        for i, (layer, linears) in enumerate(zip(self.model.model.layers, self.linears)):
            qkv, o, gate_up, down = map(_int4_struct, linears)
            structs.append(DecodeLayer(
                layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                qkv, o, gate_up, down, pool.k_buffers[i].data_ptr(), pool.v_buffers[i].data_ptr(),
                layer.self_attn.attn.sliding_window or 0))
        return (DecodeLayer * len(structs))(*structs)


def decode_queries_on_kernels(fb: Any, rows_on_kernel: Callable[[int, bool], bool]) -> bool:
    """Whether a forward batch runs as decode queries through the fused kernels:
    a decode batch, or a speculative verify (an extend of a few tokens a
    request, each attending as a decode query: short_extend_rows), with as many
    rows as the eager linears would also multiply on a C++ kernel
    (rows_on_kernel(rows, in a decode step): cpu_quantized_paths.int4_rows_on_kernel,
    int8_rows_on_kernel; a verify runs as a decode step,
    ForwardBatch.as_decode_step), torch-native attention over a bfloat16 pool."""
    k_buf = fb.kv_pool.k_buffers[0]
    decode = fb.forward_mode.is_decode()
    verify = (fb.forward_mode.is_extend() and fb.attn_metadata.short_extend_rows is not None
              and not fb.mm_items)
    return ((decode or verify) and rows_on_kernel(fb.input_ids.shape[0], decode or fb.as_decode_step)
            and type(fb.attn_backend) is TorchNativeAttnBackend and not fb.attn_backend.deterministic
            and type(fb.kv_pool.k_buffers) is list and k_buf.dtype == torch.bfloat16
            and k_buf.stride(-1) == 1 and fb.kv_pool.v_buffers[0].stride(-1) == 1
            and fb.positions.dtype == torch.int64 and fb.positions.is_contiguous())


def decode_batch(fb: Any) -> Tuple[DecodeBatch, List[torch.Tensor]]:
    """The C++ side's view of a batch decode_queries_on_kernels took, and the
    tensors it points into (to be kept alive until the call returns)."""
    meta = fb.attn_metadata
    if fb.forward_mode.is_decode():
        slots, seq_lens = meta.kv_indices, fb.seq_lens.contiguous()
    else:
        slots, seq_lens = meta.short_extend_rows
    new_slots = fb.out_cache_loc.contiguous()
    if slots.dtype != torch.int64 or slots.stride(-1) != 1:
        slots = slots.to(torch.int64).contiguous()
    batch = DecodeBatch(fb.input_ids.shape[0], fb.positions.data_ptr(), slots.data_ptr(), slots.stride(0),
                        seq_lens.data_ptr(), new_slots.data_ptr())
    return batch, [slots, seq_lens, new_slots]


def set_pool_strides(shape: DecodeShape, pool: Any, rotary: Any) -> None:
    """The KV pool's strides and the rotary table's address, as of now."""
    k0, v0 = pool.k_buffers[0], pool.v_buffers[0]
    shape.k_slot_stride, shape.k_head_stride, shape.v_slot_stride, shape.v_head_stride = (
        k0.stride(0), k0.stride(1), v0.stride(0), v0.stride(1))
    shape.rope_table = rotary.cos_sin_cache.data_ptr()
