"""Qwen2-VL: Qwen2.5-VL's predecessor and the same pipeline (models/qwen2_5_vl.py)
with a simpler vision tower: LayerNorms, an fc1 -> quick-GELU -> fc2 MLP, and
every block attending over a whole image (no windows). Model math only."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from radixserve.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration, VisionTransformer


def layer_norm(dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6)


class VisionFcMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        if act != "quick_gelu":
            raise ValueError(f"vision_config.hidden_act {act!r} is not supported (Qwen2-VL uses quick_gelu)")
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick GELU


class Qwen2VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    @staticmethod
    def make_visual(vision_config: Any) -> nn.Module:
        dim = vision_config.embed_dim
        hidden = int(dim * vision_config.mlp_ratio)
        return VisionTransformer(vision_config, dim=dim, out_dim=vision_config.hidden_size, norm=layer_norm,
                                 make_mlp=lambda: VisionFcMLP(dim, hidden, vision_config.hidden_act),
                                 windowed=False)
