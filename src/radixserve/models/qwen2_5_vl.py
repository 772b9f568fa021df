"""Qwen2.5-VL: a vision transformer (patch embedding, window attention with a
few full-attention blocks, 2-D rotary positions, a 2x2 patch merger) whose
output replaces the image tokens' embeddings in a Qwen2 decoder with
multimodal rotary positions (M-RoPE). Model math only: which image rows a
forward needs, the positions and the cache keys are built in multimodal/.

The vision tower runs replicated (no tensor parallelism) in the model's dtype.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.layers.embedding import LMHead
from radixserve.layers.layernorm import RMSNorm
from radixserve.layers.rotary import MRotaryEmbedding
from radixserve.mem_cache.kv_layout import default_kv_layout
from radixserve.models.llama import BlockOptions, LlamaForCausalLM, LlamaModel, run_decoder

Grid = Tuple[int, int, int]  # (t, h, w) in patches


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: List[int]) -> torch.Tensor:
        """x [N, dim]; attention only within each [cu_seqlens[i], cu_seqlens[i+1]) segment."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        dtype = q.dtype
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(dtype)
        return self.proj(segment_attention(q, k, v, cu_seqlens).reshape(n, -1))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: List[int]) -> torch.Tensor:
    """Bidirectional attention within each [bounds[i], bounds[i+1]) of [N, heads, d]
    tensors, all segments in one call: padded to the longest, padding keys masked."""
    lengths = torch.tensor(bounds[1:], device=q.device) - torch.tensor(bounds[:-1], device=q.device)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    offsets = torch.arange(longest, device=q.device)
    valid = offsets[None, :] < lengths[:, None]  # [segments, longest]
    rows = (torch.tensor(bounds[:-1], device=q.device)[:, None] + offsets).clamp(max=q.shape[0] - 1)
    q_, k_, v_ = (t[rows].transpose(1, 2) for t in (q, k, v))  # [segments, heads, longest, d]
    out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=valid[:, None, None, :])
    return out.transpose(1, 2)[valid]  # back to [N, heads, d], in order


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


Norm = Callable[[int], nn.Module]  # width -> a norm layer


def rms_norm(dim: int) -> nn.Module:
    return RMSNorm(dim, 1e-6)


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, norm: Norm) -> None:
        super().__init__()
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: List[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each 2x2 block of neighbouring patches (adjacent rows after the
    processor's ordering) into one token of the decoder's width."""

    def __init__(self, out_dim: int, dim: int, merge: int, norm: Norm) -> None:
        super().__init__()
        self.in_dim = dim * merge * merge
        self.ln_q = norm(dim)
        self.mlp = nn.Sequential(nn.Linear(self.in_dim, self.in_dim), nn.GELU(), nn.Linear(self.in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.in_dim))


class PatchEmbed(nn.Module):
    """A Conv3d whose stride is its kernel: one matmul over flattened patches."""

    def __init__(self, config: Any, dim: int) -> None:
        super().__init__()
        self.embed_dim = dim
        p, t = config.patch_size, config.temporal_patch_size
        self.proj = nn.Conv3d(config.in_channels, dim, (t, p, p), (t, p, p), bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.view(self.embed_dim, -1)
        return patches.to(weight.dtype) @ weight.t()


def vision_positions(grids: Sequence[Grid], merge: int) -> torch.Tensor:
    """(row, column) of every patch, in the processor's order (2x2 merge blocks
    contiguous): [num_patches, 2]."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        pos = torch.stack([rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()], dim=-1)
        out.append(pos.repeat(t, 1))
    return torch.cat(out)


def window_order(grids: Sequence[Grid], merge: int, window: int) -> Tuple[torch.Tensor, List[int]]:
    """The merged tokens regrouped window by window (window x window merged
    tokens, row-major windows per frame) and the window boundaries in patches."""
    order, bounds, base = [], [0], 0
    unit = merge * merge
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).view(t, gh, gw) + base
        for frame in range(t):
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    block = ids[frame, r:r + window, c:c + window].flatten()
                    order.append(block)
                    bounds.append(bounds[-1] + len(block) * unit)
        base += t * gh * gw
    return torch.cat(order), bounds


class VisionTransformer(nn.Module):
    """Qwen2.5-VL's tower by default; Qwen2-VL's (models/qwen2_vl.py) passes its
    width, LayerNorms, fc1/fc2 MLP and no windows (every block attends a whole image)."""

    def __init__(self, config: Any, dim: Optional[int] = None, out_dim: Optional[int] = None,
                 norm: Norm = rms_norm, make_mlp: Optional[Callable[[], nn.Module]] = None,
                 windowed: bool = True) -> None:
        super().__init__()
        dim = dim or config.hidden_size
        make_mlp = make_mlp or (lambda: VisionMLP(dim, config.intermediate_size))
        self.merge = config.spatial_merge_size
        self.window = config.window_size // config.spatial_merge_size // config.patch_size if windowed else None
        self.full_attention_blocks = set(config.fullatt_block_indexes) if windowed else set(range(config.depth))
        self.patch_embed = PatchEmbed(config, dim)
        head_dim = dim // config.num_heads
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        quarter = head_dim // 2
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter),
                             persistent=False)
        self.blocks = nn.ModuleList(VisionBlock(dim, config.num_heads, make_mlp(), norm) for _ in range(config.depth))
        self.merger = PatchMerger(out_dim or config.out_hidden_size, dim, self.merge, norm)

    def forward(self, patches: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """patches [num_patches, C*T*P*P] (the processor's pixel_values) ->
        [num_patches / merge^2, out_hidden], image after image."""
        unit = self.merge * self.merge
        full_bounds = [0]  # full attention: within each frame of each image
        for t, h, w in grids:
            for _ in range(t):
                full_bounds.append(full_bounds[-1] + h * w)
        if self.window is None:
            order, window_bounds = torch.arange(full_bounds[-1] // unit), full_bounds
        else:
            order, window_bounds = window_order(grids, self.merge, self.window)
        x = self.patch_embed(patches)
        order = order.to(x.device)
        x = x.view(-1, unit, x.shape[-1])[order].flatten(0, 1)
        # [N, 2 (row, col), head_dim/4] -> [N, head_dim/2]: row angles, then column angles
        angles = (vision_positions(grids, self.merge).to(x.device).float()[..., None] * self.inv_freq).flatten(1)
        angles = angles.view(-1, unit, angles.shape[-1])[order].flatten(0, 1)
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # [N, 1, head_dim]
        cos, sin = angles.cos(), angles.sin()
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full_bounds if i in self.full_attention_blocks else window_bounds)
        return self.merger(x)[torch.argsort(order)]


class Qwen2_5_VLForConditionalGeneration(LlamaForCausalLM):
    """The decoder is Qwen2's (q/k/v biases) with M-RoPE; `visual` encodes images."""

    # transformers 5 saves the decoder under model.language_model and the tower
    # under model.visual; Qwen's released checkpoints use model.* and visual.*.
    CHECKPOINT_RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))
    supports_deterministic_inference = False

    @classmethod
    def block_options(cls, config: Any) -> BlockOptions:
        return BlockOptions(qkv_bias=True)

    @classmethod
    def kv_layout(cls, config: Any):
        return default_kv_layout(config.get_text_config())

    def __init__(self, config: Any) -> None:
        nn.Module.__init__(self)
        text = config.get_text_config()
        self.config = config
        self.visual = self.make_visual(config.vision_config)
        self.model = LlamaModel(text, self.block_options(text), rotary_cls=MRotaryEmbedding)
        self.tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))
        self.lm_head = LMHead(text.vocab_size, text.hidden_size)
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.vocab_size = text.vocab_size

    @staticmethod
    def make_visual(vision_config: Any) -> nn.Module:
        return VisionTransformer(vision_config)

    def encode_images(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """Every image's merged tokens, in the decoder's width: [tokens, hidden]."""
        return self.visual(pixel_values, grids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: Any) -> torch.Tensor:
        """Image tokens carry ids past the vocabulary (their image's cache key);
        their embeddings come from forward_batch.mm_embeds, in order."""
        image = input_ids >= self.vocab_size
        embeds = self.model.embed_tokens(input_ids.masked_fill(image, 0))
        mm_embeds = getattr(forward_batch, "mm_embeds", None)
        if mm_embeds is not None:
            embeds[image] = mm_embeds.to(embeds.dtype)
        mrope = getattr(forward_batch, "mrope_positions", None)
        return run_decoder(self.model, input_ids, mrope if mrope is not None else positions, forward_batch, embeds)
