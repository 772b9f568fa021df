"""The Triton attention backend: our paged-attention kernels (paged_attention.py).

Decode needs no per-batch host work beyond choosing the number of KV splits,
which depends on the batch size alone, so CUDA graphs capture forward_decode
as is and replay it with new lengths in the same buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from radixserve.layers.attention.base import AttentionBackend
from radixserve.layers.attention.mla_backend import MLABackend
from radixserve.layers.attention.paged_attention import (
    decode_attention,
    decode_num_splits,
    extend_attention,
    fixed_decode_splits,
)

if TYPE_CHECKING:
    from radixserve.layers.attention.radix_attention import RadixAttention
    from radixserve.model_executor.forward_batch import ForwardBatch


@dataclass
class MixedMetadata:
    """A mixed batch split in two: the decode rows' KV split count, and the
    extend part's per-request tensors with its token offsets counted from its
    own first token (its queries are passed as a slice of the batch's)."""

    decode_splits: int
    max_extend_len: int
    req_pool_indices: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    extend_starts: torch.Tensor


class TritonAttnBackend(AttentionBackend, MLABackend):
    def __init__(self, device: torch.device, deterministic_context_len: Optional[int] = None) -> None:
        """deterministic_context_len: batch-invariant decode (--enable-deterministic-
        inference): KV splits of a fixed number of positions covering this length,
        instead of a split count chosen from the batch size."""
        # The CPU (the Triton interpreter in tests) has no SMs; any count works there.
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
        self.fixed_splits = None
        if deterministic_context_len is not None:
            self.fixed_splits = fixed_decode_splits(deterministic_context_len)

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        fb = forward_batch
        if fb.forward_mode.is_decode():
            # Deterministic mode: this many programs share the fixed splits.
            num_kv_heads = fb.kv_pool.k_buffers[0].shape[1]
            fb.attn_metadata = decode_num_splits(fb.batch_size, num_kv_heads, self.num_sms)
        elif fb.forward_mode.is_mixed():
            n = fb.num_decode_rows
            fb.attn_metadata = MixedMetadata(
                decode_num_splits(n, fb.kv_pool.k_buffers[0].shape[1], self.num_sms), max(fb.extend_seq_lens_cpu[n:]),
                fb.req_pool_indices[n:], fb.extend_prefix_lens[n:], fb.extend_seq_lens[n:], fb.extend_start_loc[n:] - n)
        else:
            fb.attn_metadata = max(fb.extend_seq_lens_cpu, default=0)

    def forward_extend(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch", cached: bool = False):
        fb = forward_batch
        k_buf, v_buf = self._store_kv(k, v, layer, fb, cached)
        out = torch.empty_like(q)
        extend_attention(
            q, k_buf, v_buf, out, fb.req_to_token_pool.req_to_token, fb.req_pool_indices,
            fb.extend_prefix_lens, fb.extend_seq_lens, fb.extend_start_loc, fb.attn_metadata, layer.scaling,
            sliding_window=layer.sliding_window, sinks=layer.sinks, tree_mask=fb.spec_tree_mask,
            tree_positions=fb.positions if fb.spec_tree_mask is not None else None,
        )
        return out

    def forward_decode(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch", cached: bool = False):
        fb = forward_batch
        k_buf, v_buf = self._store_kv(k, v, layer, fb, cached)
        out = torch.empty_like(q)
        decode_attention(
            q, k_buf, v_buf, out, fb.req_to_token_pool.req_to_token, fb.req_pool_indices, fb.seq_lens,
            layer.scaling, self.fixed_splits[0] if self.fixed_splits else fb.attn_metadata,
            sliding_window=layer.sliding_window, sinks=layer.sinks,
            split_tokens=self.fixed_splits[1] if self.fixed_splits else None, split_programs=fb.attn_metadata,
        )
        return out

    def forward_mixed(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch", cached: bool = False):
        """The decode rows through the split-KV decode kernel: the extend kernel
        would run a whole query tile over each one's context for one query."""
        fb, meta, n = forward_batch, forward_batch.attn_metadata, forward_batch.num_decode_rows
        k_buf, v_buf = self._store_kv(k, v, layer, fb, cached)
        table = fb.req_to_token_pool.req_to_token
        out = torch.empty_like(q)
        decode_attention(
            q[:n], k_buf, v_buf, out[:n], table, fb.req_pool_indices[:n], fb.seq_lens[:n], layer.scaling,
            meta.decode_splits, sliding_window=layer.sliding_window, sinks=layer.sinks,
        )
        extend_attention(
            q[n:], k_buf, v_buf, out[n:], table, meta.req_pool_indices, meta.prefix_lens, meta.extend_lens,
            meta.extend_starts, meta.max_extend_len, layer.scaling, sliding_window=layer.sliding_window,
            sinks=layer.sinks,
        )
        return out

    @staticmethod
    def _store_kv(k, v, layer: "RadixAttention", fb: "ForwardBatch", cached: bool):
        """The layer's K and V buffers, k and v stored in them first unless `cached`."""
        if not cached:
            shape = (k.shape[0], layer.num_kv_heads, layer.head_dim)
            fb.kv_pool.set_kv(layer.layer_id, fb.out_cache_loc, k.view(shape), v.view(shape))
        return fb.kv_pool.k_buffers[layer.layer_id], fb.kv_pool.v_buffers[layer.layer_id]

    # ---- MLA (DeepSeek): kernels in mla_triton.py ----
    def mla_attend_latent(self, q_latent, q_pe, layer, forward_batch):
        """Decode computes its split count from the batch size alone, so a CUDA
        graph captures it as is."""
        from radixserve.layers.attention import mla_triton

        fb = forward_batch
        buf = fb.kv_pool.latent_buffers[layer.layer_id]
        table = fb.req_to_token_pool.req_to_token
        out = q_latent.new_empty(q_latent.shape)
        if fb.forward_mode.is_decode():
            splits = mla_triton.mla_decode_num_splits(fb.batch_size, layer.num_heads, self.num_sms)
            mla_triton.mla_decode_attention(
                q_latent, q_pe, buf, out, table, fb.req_pool_indices, fb.seq_lens, layer.scaling, splits
            )
        else:
            mla_triton.mla_extend_latent_attention(
                q_latent, q_pe, buf, out, table, fb.req_pool_indices, fb.extend_prefix_lens, fb.extend_seq_lens,
                fb.extend_start_loc, max(fb.extend_seq_lens_cpu), layer.scaling,
            )
        return out

    def mla_attend_expanded(self, q_nope, q_pe, k_nope, k_pe, v, kv_start_loc, layer, forward_batch):
        from radixserve.layers.attention import mla_triton

        fb = forward_batch
        out = q_nope.new_empty(q_nope.shape[:2] + (layer.v_head_dim,))
        mla_triton.mla_extend_expanded_attention(
            q_nope, q_pe, k_nope, k_pe, v, out, fb.extend_prefix_lens, fb.extend_seq_lens, fb.extend_start_loc,
            kv_start_loc, max(fb.extend_seq_lens_cpu), layer.scaling,
        )
        return out
