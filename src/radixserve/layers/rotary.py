"""Rotary position embedding, with the frequency scalings HF configs name.

Applied in the "rotate half" (GPT-NeoX) layout HF checkpoints use; GGUF q/k
weights are un-permuted into it at load time. One table of cos|sin per model,
shared by every layer, indexed by each token's position: no per-sequence
state, so batching and prefix caching never touch it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch
from torch import nn

from radixserve.layers import cpu_kernels

if TYPE_CHECKING:
    from radixserve.layers.fused_kernels import KVCacheRows

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_parameters(config: Any) -> Dict[str, Any]:
    """The rope settings of `config` as one flat dict with `rope_type` and `rope_theta`.

    transformers 5 keeps theta and scaling in `config.rope_parameters`; older
    configs (and hand-built namespaces) have `rope_theta` and `rope_scaling`,
    whose type key was once spelled `type`.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:  # per-layer-type form; these families use one type
        params = dict(params["full_attention"])
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params.setdefault("rope_type", params.get("type") or "default")
    # A scaled rope is tuned to its pretraining length; HF falls back to the
    # config's max length when the checkpoint does not say.
    params.setdefault("original_max_position_embeddings", getattr(config, "max_position_embeddings", None))
    return params


def rotary_inv_freq(dim: int, params: Dict[str, Any], max_position: int) -> Tuple[torch.Tensor, float]:
    """Inverse frequencies (float64 on the CPU, [dim/2]) and the factor cos/sin are scaled by."""
    base = float(params["rope_theta"])
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq, 1.0
    if kind == "dynamic":
        # Dynamic NTK only changes the base for positions past the original
        # length; HF sets that length to max_position_embeddings, the size of
        # our table, so every position we can index is unscaled.
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, params, max_position), 1.0
    if kind == "yarn":
        return _yarn(dim, base, params, max_position)
    raise ValueError(f"unsupported rope_type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _original_len(p: Dict[str, Any], max_position: int) -> float:
    return float(p.get("original_max_position_embeddings") or max_position)


def _llama3(inv_freq: torch.Tensor, p: Dict[str, Any], max_position: int) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth
    blend in between."""
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    original = _original_len(p, max_position)
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    middle = (wavelen <= original / low) & (wavelen >= original / high)
    return torch.where(middle, blended, slowed)


def _yarn(dim: int, base: float, p: Dict[str, Any], max_position: int) -> Tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies, keep the high ones, ramp between
    the dimensions that turn `beta_slow` and `beta_fast` times over the
    original context; cos/sin get an attention temperature."""
    original = _original_len(p, max_position)
    factor = float(p.get("factor") or max_position / original)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = p.get("attention_factor")
    if attention is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolated = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)
    inv_freq = extrapolated / factor * ramp + extrapolated * (1 - ramp)
    return inv_freq, float(attention)


class RotaryEmbedding(nn.Module):
    """cos|sin table for positions [0, max_position), applied to q and k."""

    def __init__(self, head_dim: int, max_position: int, params: Dict[str, Any]) -> None:
        super().__init__()
        if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial rotary embeddings are not supported by this model family")
        self.head_dim = head_dim
        self.max_position = max_position
        inv_freq, scale = rotary_inv_freq(head_dim, params, max_position)
        # Built in float64 on the CPU (exact angles at long positions, and some
        # devices lack float64), then moved to wherever the model is built.
        t = torch.arange(max_position, dtype=torch.float64, device="cpu")
        freqs = torch.outer(t, inv_freq)
        table = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * scale
        device = torch.empty(0).device  # honours an enclosing `with torch.device(...)`
        # Float32 buffer, not a parameter: never loaded, and not cast by
        # set_default_dtype (an explicit dtype), so bf16 models keep exact angles.
        self.register_buffer("cos_sin_cache", table.to(device=device, dtype=torch.float32), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
        q_norm: Optional[nn.Module] = None, k_norm: Optional[nn.Module] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads*head_dim], k: [T, kv_heads*head_dim]; returns both rotated, same dtype.
        q_norm, k_norm: RMSNorms over each head, applied before rotating (Qwen3);
        one kernel with the rotation on CUDA."""
        if q.is_cuda and q.stride(-1) == 1 and k.stride(-1) == 1:
            from radixserve.layers.fused_kernels import rotary

            norms = None if q_norm is None else (q_norm.weight, k_norm.weight, q_norm.eps)
            return rotary(positions, q, k, self.cos_sin_cache, self.head_dim, norms)
        q, k = self._norm_heads(q, q_norm), self._norm_heads(k, k_norm)
        qk = _side_by_side(q, k)
        if cpu_kernels.takes_rows(q) and cpu_kernels.takes_rows(k) and positions.dim() == 1 \
                and positions.dtype == torch.int64 and positions.is_contiguous():
            # the CPU's fused kernel: one call (q | k side by side) or two
            if qk is not None:
                return self._rotate_in_kernel(qk, positions).split([q.shape[-1], k.shape[-1]], dim=-1)
            return self._rotate_in_kernel(q, positions), self._rotate_in_kernel(k, positions)
        cos, sin = self._whole_head_tables()
        cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [T, 1, head_dim]
        if qk is not None:  # q | k columns of one q|k|v output: rotated in one pass
            return self._rotate(qk, cos, sin).split([q.shape[-1], k.shape[-1]], dim=-1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def rotate_into_cache(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm: Optional[nn.Module],
        k_norm: Optional[nn.Module], v: torch.Tensor, rows: "KVCacheRows",
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """forward's result, with the rotated keys and v also written to the
        layer's cache rows in the same kernel (CUDA; then the attention backend
        must not store them again: `cached=True`). None where it cannot (off
        CUDA, multimodal positions): rotate with forward instead."""
        if not (q.is_cuda and positions.dim() == 1 and q.stride(-1) == 1 and k.stride(-1) == 1
                and v.stride(-1) == 1):
            return None
        from radixserve.layers.fused_kernels import rotary

        norms = None if q_norm is None else (q_norm.weight, k_norm.weight, q_norm.eps)
        return rotary(positions, q, k, self.cos_sin_cache, self.head_dim, norms, cache=(v, rows))

    def forward_interleaved(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The GPT-J layout (DeepSeek's rope): pairs (x0, x1), (x2, x3), ... of
        each head rotate together. q [T, H, D], k [T, D], any views with a
        contiguous last axis. Returns q [T, H*D] and k [T, D], each head laid out
        as [evens | odds] and rotated: q and k move alike, so every q.k is the
        interleaved rotation's. (On CUDA, fused_kernels.mla_latent_kv reads the
        pairs in place instead of copying them.)"""
        q = torch.cat([q[..., 0::2], q[..., 1::2]], dim=-1)
        k = torch.cat([k[..., 0::2], k[..., 1::2]], dim=-1)
        return self.forward(positions, q.reshape(q.shape[0], -1), k.reshape(k.shape[0], -1))

    def _rotate_in_kernel(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.rotary(x, positions, self.cos_sin_cache, self.head_dim)

    def _norm_heads(self, x: torch.Tensor, norm: Optional[nn.Module]) -> torch.Tensor:
        return x if norm is None else norm(x.reshape(-1, self.head_dim)).view(x.shape)

    def _whole_head_tables(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos|cos and -sin|sin per position [max_position, head_dim], made on
        first use off CUDA: with them a rotation is x * cos + (x with its halves
        swapped) * sin, five torch calls instead of eleven. A CPU decode step is
        made of small calls, each costing more to launch than to run."""
        tables = self.__dict__.get("_tables")
        if tables is None or tables[0].device != self.cos_sin_cache.device:
            cos, sin = self.cos_sin_cache.chunk(2, dim=-1)
            tables = self._tables = (torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1))
        return tables

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads*head_dim]; cos, sin [T, 1, head_dim] (`_whole_head_tables`, or an
        MRotary's); returns [x1 * cos - x2 * sin, x2 * cos + x1 * sin] per head, x's dtype."""
        shape, dtype = x.shape, x.dtype
        x = x.reshape(shape[0], -1, self.head_dim).float()
        out = x * cos + x.roll(self.head_dim // 2, dims=-1) * sin
        return out.to(dtype).view(shape)


def _side_by_side(q: torch.Tensor, k: torch.Tensor) -> Optional[torch.Tensor]:
    """[q | k] as one view when k's columns follow q's in the same rows (a
    2-D slice of a q|k|v output), else None."""
    if q.dim() != 2 or k.dim() != 2 or q.stride(-1) != 1 or k.stride(-1) != 1 or q.stride(0) != k.stride(0) \
            or q.dtype != k.dtype or k.data_ptr() != q.data_ptr() + q.shape[1] * q.element_size():
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1]), q.stride())


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal rotary positions (Qwen2-VL, Qwen2.5-VL): each token has three
    positions (time, height, width); the rotary frequencies are split into
    `mrope_section` runs and run i turns with position i. A text token's three
    positions are equal, so with 1-D positions this is plain rotary."""

    def __init__(self, head_dim: int, max_position: int, params: Dict[str, Any]) -> None:
        if params.get("rope_type") == "mrope":  # older configs' name for these unscaled frequencies
            params = {**params, "rope_type": "default"}
        super().__init__(head_dim, max_position, params)
        sections = list(params.get("mrope_section") or [])
        if sum(sections) != head_dim // 2:
            raise ValueError(f"mrope_section {sections} must add up to head_dim / 2 = {head_dim // 2}")
        # frequency j of the half head turns with position axis_of[j]
        axis_of = torch.repeat_interleave(torch.arange(3), torch.tensor(sections))
        self.register_buffer("axis_of", axis_of.to(self.cos_sin_cache.device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                q_norm: Optional[nn.Module] = None, k_norm: Optional[nn.Module] = None,
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] (text only) or [3, T] (time, height, width)."""
        if positions.dim() == 1:
            return super().forward(positions, q, k, q_norm, k_norm)
        q, k = self._norm_heads(q, q_norm), self._norm_heads(k, k_norm)
        cos, sin = self._whole_head_tables()
        pick = self.axis_of.repeat(2).view(1, 1, -1).expand(1, positions.shape[1], -1)
        cos = cos[positions].gather(0, pick)[0].unsqueeze(1)  # [T, 1, head_dim]
        sin = sin[positions].gather(0, pick)[0].unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
