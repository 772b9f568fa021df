"""Rotary position embedding, with the frequency scalings HF configs name.

Applied in the "rotate half" layout HF checkpoints use (GGUF q/k weights are
un-permuted into it at load time)."""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import torch
from torch import nn


def rope_parameters(config: Any) -> Dict[str, Any]:
    """transformers 5 keeps theta and scaling in config.rope_parameters; older
    configs have rope_theta and rope_scaling."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _inv_freq(dim: int, params: Dict[str, Any], max_position: int) -> Tuple[torch.Tensor, float]:
    base = float(params.get("rope_theta", 10000.0))
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / params["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv_freq, params, max_position), 1.0
    raise ValueError(f"unsupported rope_type {kind!r}; supported: default, linear, llama3")


def _llama3(inv_freq: torch.Tensor, p: Dict[str, Any], max_position: int) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth
    blend in between."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    original = p.get("original_max_position_embeddings", max_position)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    middle = (wavelen <= original / low) & (wavelen >= original / high)
    return torch.where(middle, blended, out)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: Dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq, scale = _inv_freq(head_dim, params, max_position)
        t = torch.arange(max_position, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        # Float32 tables (not parameters: never loaded, never cast to bf16).
        self.register_buffer("cos", (freqs.cos() * scale).float(), persistent=False)
        self.register_buffer("sin", (freqs.sin() * scale).float(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, heads*head_dim], k: [T, kv_heads*head_dim]."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return self._apply(q, cos, sin), self._apply(k, cos, sin)

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.view(shape[0], -1, self.head_dim).float()
        x1, x2 = x.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(dtype).view(shape)
