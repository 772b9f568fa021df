"""Attention over the paged KV cache in plain torch: runs on any device.

Extend loops over requests (each a causal block on top of its cached prefix);
decode is one padded, batched computation. The Triton backend replaces both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from radixserve.layers.attention.base import AttentionBackend

if TYPE_CHECKING:
    from radixserve.layers.attention.radix_attention import RadixAttention
    from radixserve.model_executor.forward_batch import ForwardBatch


class TorchNativeAttnBackend(AttentionBackend):
    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        fb = forward_batch
        max_len = max(fb.seq_lens_cpu) if fb.seq_lens_cpu else 0
        # Slot of every position of every request, padded to the longest one.
        kv_indices = fb.req_to_token_pool.req_to_token[fb.req_pool_indices, :max_len]
        valid = torch.arange(max_len, device=kv_indices.device)[None, :] < fb.seq_lens[:, None]
        fb.attn_metadata = (kv_indices, valid)

    def forward_extend(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch"):
        fb = forward_batch
        fb.kv_pool.set_kv(layer.layer_id, fb.out_cache_loc, _heads(k, layer), _heads(v, layer))
        k_buf = fb.kv_pool.k_buffers[layer.layer_id]
        v_buf = fb.kv_pool.v_buffers[layer.layer_id]
        kv_indices, _ = fb.attn_metadata
        q = _heads(q, layer, layer.num_heads)
        out = torch.empty_like(q)
        start = 0
        for i, (prefix, extend) in enumerate(zip(fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu)):
            seq = prefix + extend
            slots = kv_indices[i, :seq]
            qi = q[start:start + extend].transpose(0, 1)  # [heads, extend, d]
            ki = k_buf[slots].transpose(0, 1).to(q.dtype)  # [kv_heads, seq, d]
            vi = v_buf[slots].transpose(0, 1).to(q.dtype)
            # Query j sits at absolute position prefix + j and sees keys 0..prefix + j.
            mask = (
                torch.arange(seq, device=q.device)[None, :]
                <= torch.arange(prefix, seq, device=q.device)[:, None]
            )
            oi = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, scale=layer.scaling,
                enable_gqa=layer.num_heads != layer.num_kv_heads,
            )
            out[start:start + extend] = oi.transpose(0, 1)
            start += extend
        return out.flatten(1)

    def forward_decode(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch"):
        fb = forward_batch
        fb.kv_pool.set_kv(layer.layer_id, fb.out_cache_loc, _heads(k, layer), _heads(v, layer))
        kv_indices, valid = fb.attn_metadata
        bs, group = q.shape[0], layer.num_heads // layer.num_kv_heads
        keys = fb.kv_pool.k_buffers[layer.layer_id][kv_indices].to(q.dtype)  # [bs, L, kvh, d]
        values = fb.kv_pool.v_buffers[layer.layer_id][kv_indices].to(q.dtype)
        qg = q.view(bs, layer.num_kv_heads, group, layer.head_dim)
        scores = torch.einsum("bhgd,blhd->bhgl", qg, keys) * layer.scaling
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.einsum("bhgl,blhd->bhgd", probs, values)
        return out.reshape(bs, layer.num_heads * layer.head_dim)


def _heads(x: torch.Tensor, layer: "RadixAttention", num_heads: int | None = None) -> torch.Tensor:
    return x.view(x.shape[0], num_heads or layer.num_kv_heads, layer.head_dim)
