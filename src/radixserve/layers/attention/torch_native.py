"""Attention over the paged KV cache in plain torch: runs on any device.

Extend loops over requests (each a causal block on top of its cached prefix,
or a speculative draft tree's mask: ForwardBatch.spec_tree_mask);
decode is one padded, batched computation. Both go through SDPA's fused
kernel, except layers with attention sinks (gpt-oss), which SDPA lacks. On the
CPU, decode runs cpu_kernels' paged kernel instead where it is built: it reads
the keys in the pool in place, where SDPA needs them gathered first.
The Triton backend replaces both.
Deterministic mode (--enable-deterministic-inference) runs both, request by
request, through blocked_attention.py, whose result for a query does not
depend on the batch, the chunking or the radix cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
import torch.nn.functional as F

from radixserve.layers import cpu_kernels
from radixserve.layers.attention.base import AttentionBackend
from radixserve.layers.attention.blocked_attention import blocked_attention
from radixserve.layers.attention.mla_backend import MLABackend
from radixserve.layers.cpu_gemm_rows import pad_keys, pad_queries
from radixserve.utils.cpu_features import cpu_has_native_bf16

if TYPE_CHECKING:
    from radixserve.layers.attention.radix_attention import RadixAttention
    from radixserve.model_executor.forward_batch import ForwardBatch

# A decode batch of up to this many requests attends in float32 on a CPU
# without bfloat16 units, where a bfloat16 matmul is converted element by
# element: one layer's decode attention of the default model's shape (9 heads,
# 256 keys) took 190 us in bfloat16 against 115 in float32 at batch 1, 1,120
# against 706 at batch 8; at 32 the conversion of the gathered keys cost more
# than it saved (2-core AVX-512 Xeon without BF16; measured with grouped
# matmuls, before decode went through SDPA's fused kernel).
FLOAT32_DECODE_MAX_BATCH = 8

# An extend of at most this many queries per request (a speculative verify
# step: the last token and its drafts) attends as decode queries: through the
# decode kernel when the CPU kernels take it (short_extend_rows), else in
# decode's dtype (float32 for a small batch on a CPU without bfloat16 units), so
# its greedy choices agree with plain decoding's.
SHORT_EXTEND = 16

# A lone decode request whose slots form at most this many runs of consecutive
# slots reads its keys run by run (a cached prefix and the request's own slots
# are two runs); more runs, and it gathers them.
MAX_SLOT_RUNS = 8


@dataclass
class TorchAttnMetadata:
    kv_indices: torch.Tensor  # [bs, longest] the slot of every position, padded
    valid: torch.Tensor  # [bs, longest] which of them are real
    # A decode of one request whose slots form a few runs of consecutive slots:
    # the runs as (first, stop) slot ranges, in position order (its keys are
    # slices of the pool: no gather), else None.
    slot_runs: Optional[List[Tuple[int, int]]] = None
    # Every request as long as the longest: nothing is padded, no mask needed.
    unpadded: bool = False
    # An extend whose every request continues its prefix by a few tokens (a
    # speculative chain's verify, a short follow-up): each new token as a decode
    # query of its own, (its request's slots [rows, longest], its sequence
    # length [rows]), for decode_attention; else None.
    short_extend_rows: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


class TorchNativeAttnBackend(AttentionBackend, MLABackend):
    def __init__(self, deterministic: bool = False) -> None:
        self.deterministic = deterministic

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        fb = forward_batch
        max_len = max(fb.seq_lens_cpu) if fb.seq_lens_cpu else 0
        # Slot of every position of every request, padded to the longest one.
        kv_indices = fb.req_to_token_pool.req_to_token[fb.req_pool_indices, :max_len]
        valid = torch.arange(max_len, device=kv_indices.device)[None, :] < fb.seq_lens[:, None]
        unpadded = bool(fb.seq_lens_cpu) and min(fb.seq_lens_cpu) == max_len
        fb.attn_metadata = TorchAttnMetadata(kv_indices, valid, _slot_runs(kv_indices, fb), unpadded,
                                             None if self.deterministic else _short_extend_rows(kv_indices, fb))

    def forward_extend(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch", cached: bool = False):
        fb = forward_batch
        short_rows = fb.attn_metadata.short_extend_rows
        if short_rows is not None and layer.sinks is None:
            k_buf, v_buf = fb.kv_pool.k_buffers[layer.layer_id], fb.kv_pool.v_buffers[layer.layer_id]
            if cpu_kernels.takes_decode_attention(q, k_buf, v_buf, k, v):
                # Query j of a request sees its first prefix + j + 1 positions: a
                # decode query of that length. The kernel stores the new K/V, then
                # reads the pool in place, as plain decoding does (a verify step's
                # greedy choices then agree with plain decoding's).
                slots, seq_lens = short_rows
                return cpu_kernels.decode_attention(q, k_buf, v_buf, slots, seq_lens, layer.num_kv_heads,
                                                    layer.scaling, layer.sliding_window, (fb.out_cache_loc, k, v))
        if not cached:
            fb.kv_pool.set_kv(layer.layer_id, fb.out_cache_loc, _heads(k, layer), _heads(v, layer))
        k_buf = fb.kv_pool.k_buffers[layer.layer_id]
        v_buf = fb.kv_pool.v_buffers[layer.layer_id]
        kv_indices = fb.attn_metadata.kv_indices
        q = _heads(q, layer, layer.num_heads)
        if self.deterministic:
            positions = [range(p, p + e) for p, e in zip(fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu)]
            return self._blocked(q, positions, kv_indices, layer, fb)
        out = torch.empty_like(q)
        start = 0
        short_dtype = _decode_dtype(q, len(fb.extend_seq_lens_cpu))
        window = layer.sliding_window
        # A new prompt's keys are all in this batch's own rows: attention reads
        # them there, causal, with no gather from the pool and no mask to build
        # (a 32 x 128-token prefill of the default model: 535 -> 485 ms of
        # attention in one profile; most of the rest was the K/V store's first
        # touch of the pool's pages, which TokenAllocator's order now avoids).
        plain_causal = (window is None and fb.spec_tree_mask is None and layer.sinks is None
                        and k_buf.dtype == k.dtype and v_buf.dtype == v.dtype)
        new_k, new_v = _heads(k, layer), _heads(v, layer)
        for i, (prefix, extend) in enumerate(zip(fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu)):
            if extend == 0:  # (a request with nothing new in this batch: no rows)
                continue
            seq = prefix + extend
            if plain_causal and prefix == 0:
                dtype = short_dtype if extend <= SHORT_EXTEND else q.dtype
                rows = slice(start, start + extend)
                oi = _sdpa(*(x[rows].transpose(0, 1).to(dtype) for x in (q, new_k, new_v)), None, layer, causal=True)
                out[rows] = oi.transpose(0, 1)
                start += extend
                continue
            # Keys before the first query's window are seen by no query of this request.
            first_key = 0 if window is None else max(0, prefix - window + 1)
            slots = kv_indices[i, first_key:seq]
            short = layer.sinks is None and extend <= SHORT_EXTEND
            dtype = short_dtype if short else q.dtype
            qi = q[start:start + extend].transpose(0, 1)  # [heads, extend, d]
            ki = _rows(k_buf, slots).transpose(0, 1).to(dtype)  # [kv_heads, seq - first_key, d]
            vi = _rows(v_buf, slots).transpose(0, 1).to(dtype)
            # Query j sits at absolute position prefix + j and sees keys 0..prefix + j
            # (with a window, only the last `window` of them).
            key_pos = torch.arange(first_key, seq, device=q.device)[None, :]
            query_pos = torch.arange(prefix, seq, device=q.device)[:, None]
            mask = key_pos <= query_pos
            if fb.spec_tree_mask is not None:
                mask &= _tree_visible(fb.spec_tree_mask[start:start + extend], key_pos - prefix)
                # A tree node stands at prefix + its depth, not its row: the window counts those.
                query_pos, key_pos = _tree_positions(fb.positions[start:start + extend], key_pos, prefix)
            if window is not None:
                mask &= key_pos > query_pos - window
            if layer.sinks is not None:
                oi = _attend_with_sinks(qi, ki, vi, mask, layer)
            elif prefix == 0 and window is None and fb.spec_tree_mask is None:  # (a quantized KV pool)
                oi = _sdpa(qi.to(dtype), ki, vi, None, layer, causal=True)
            else:
                oi = _sdpa(qi.to(dtype), ki, vi, mask, layer)
            out[start:start + extend] = oi.transpose(0, 1)
            start += extend
        return out.flatten(1)

    def forward_decode(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch", cached: bool = False):
        fb = forward_batch
        meta: TorchAttnMetadata = fb.attn_metadata
        kv_indices, valid = meta.kv_indices, meta.valid
        k_buf, v_buf = fb.kv_pool.k_buffers[layer.layer_id], fb.kv_pool.v_buffers[layer.layer_id]
        if not self.deterministic and layer.sinks is None \
                and cpu_kernels.takes_decode_attention(q, k_buf, v_buf, k, v):
            # The CPU's fused kernel stores the step's K/V and reads every
            # request's keys where they lie in the pool: no gather, no padding, no mask.
            return cpu_kernels.decode_attention(q, k_buf, v_buf, kv_indices, fb.seq_lens, layer.num_kv_heads,
                                                layer.scaling, layer.sliding_window, (fb.out_cache_loc, k, v))
        if not cached:
            fb.kv_pool.set_kv(layer.layer_id, fb.out_cache_loc, _heads(k, layer), _heads(v, layer))
        if self.deterministic:
            positions = [range(n - 1, n) for n in fb.seq_lens_cpu]
            return self._blocked(_heads(q, layer, layer.num_heads), positions, kv_indices, layer, fb)
        bs, group = q.shape[0], layer.num_heads // layer.num_kv_heads
        dtype = _decode_dtype(q, bs)
        if meta.slot_runs is not None:
            keys, values = (_from_runs(buf, meta.slot_runs, dtype) for buf in (k_buf, v_buf))
        else:
            keys = _gather(k_buf, kv_indices, dtype)  # [bs, kvh, L, d]
            values = _gather(v_buf, kv_indices, dtype)
        if layer.sliding_window is not None:
            # The query sits at seq_len - 1: it sees the last `window` positions.
            first_key = fb.seq_lens[:, None] - layer.sliding_window
            valid = valid & (torch.arange(valid.shape[1], device=valid.device)[None, :] >= first_key)
        mask = valid[:, None, None, :] if layer.sliding_window is not None or not meta.unpadded else None
        if layer.sinks is not None:
            return _decode_with_sinks(q.view(bs, layer.num_kv_heads, group, layer.head_dim).to(dtype),
                                      keys, values, mask, layer).to(q.dtype)
        out = _sdpa(q.view(bs, layer.num_heads, 1, layer.head_dim).to(dtype), keys, values, mask, layer)
        return out.reshape(bs, layer.num_heads * layer.head_dim).to(q.dtype)

    @staticmethod
    def _blocked(q, positions, kv_indices, layer: "RadixAttention", fb: "ForwardBatch") -> torch.Tensor:
        """Each request's queries (at `positions[i]`, packed in q) over its own
        keys 0..last position, in blocks aligned to absolute positions."""
        k_buf, v_buf = fb.kv_pool.k_buffers[layer.layer_id], fb.kv_pool.v_buffers[layer.layer_id]
        out = torch.empty_like(q)
        start = 0
        for i, pos in enumerate(positions):
            slots = kv_indices[i, :pos.stop]
            q_pos = torch.arange(pos.start, pos.stop, device=q.device)
            out[start:start + len(pos)] = blocked_attention(
                q[start:start + len(pos)], _rows(k_buf, slots).to(q.dtype), _rows(v_buf, slots).to(q.dtype), q_pos,
                layer.scaling, layer.sliding_window, layer.sinks,
            )
            start += len(pos)
        return out.flatten(1)

    # ---- MLA (DeepSeek): the torch computations live in mla.py ----
    def mla_attend_latent(self, q_latent, q_pe, layer, forward_batch):
        from radixserve.layers.attention.mla import latent_attention_torch

        return latent_attention_torch(q_latent, q_pe, layer, forward_batch)

    def mla_attend_expanded(self, q_nope, q_pe, k_nope, k_pe, v, kv_start_loc, layer, forward_batch):
        from radixserve.layers.attention.mla import expanded_attention_torch

        return expanded_attention_torch(q_nope, q_pe, k_nope, k_pe, v, kv_start_loc, layer, forward_batch)


def _short_extend_rows(kv_indices: torch.Tensor, fb: "ForwardBatch") -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """TorchAttnMetadata.short_extend_rows, on the CPU, for an extend of a few
    tokens a request over a cached prefix: a chain's token j sees the prefix
    and tokens 0..j; a draft tree's node, the prefix and its own ancestors."""
    if fb.forward_mode.is_decode() or kv_indices.device.type != "cpu":
        return None
    prefixes, extends = fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu
    if not extends or min(prefixes) == 0 or max(extends) > SHORT_EXTEND:
        return None
    if fb.spec_tree_mask is not None:
        return _tree_rows(kv_indices, fb, prefixes, extends)
    request_of_row = torch.repeat_interleave(torch.arange(len(extends)), torch.tensor(extends))
    seq_lens = [prefix + j + 1 for prefix, extend in zip(prefixes, extends) for j in range(extend)]
    return kv_indices.index_select(0, request_of_row), torch.tensor(seq_lens, dtype=torch.int64)


def _tree_rows(kv_indices: torch.Tensor, fb: "ForwardBatch", prefixes: List[int],
               extends: List[int]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Each draft-tree node's slots: the prefix's, then its ancestors' and its
    own in depth order, which is the order of the path's positions, so the node
    attends exactly as plain decoding of that path would. None when the nodes
    are not stored parents first (then a node's ancestors are not in depth order)."""
    rows, lens, start = [], [], 0
    for i, (prefix, extend) in enumerate(zip(prefixes, extends)):
        new = torch.arange(extend)
        visible = _tree_visible(fb.spec_tree_mask[start:start + extend], new[None, :])  # [node, new token]
        count = visible.sum(1)
        if not torch.equal(fb.positions[start:start + extend], prefix + count - 1):
            return None
        # The visible tokens' indices first, ascending (stable: the others after them).
        order = torch.where(visible, new, extend + new).argsort(dim=1)
        own = kv_indices[i, prefix:prefix + extend][order]
        rows.append(torch.cat([kv_indices[i, :prefix].expand(extend, prefix), own], dim=1))
        lens.append(prefix + count)
        start += extend
    longest = max(row.shape[1] for row in rows)
    slots = torch.cat([F.pad(row, (0, longest - row.shape[1])) for row in rows])
    return slots, torch.cat(lens).to(torch.int64)


def _rows(buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """buf [slots, kv_heads, d] at the 1-D slots -> [len(slots), kv_heads, d].
    index_select over whole rows: on the CPU it is several times faster than
    advanced indexing (buf[slots]), which gathers element by element."""
    return buf.view(buf.shape[0], -1).index_select(0, slots).view(len(slots), *buf.shape[1:])


def _decode_dtype(q: torch.Tensor, bs: int) -> torch.dtype:
    """The dtype decode attention computes in: q's, except float32 for a small
    bfloat16 batch on a CPU without bfloat16 units."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and bs <= FLOAT32_DECODE_MAX_BATCH \
            and not cpu_has_native_bf16():
        return torch.float32
    return q.dtype


def _slot_runs(kv_indices: torch.Tensor, fb: "ForwardBatch") -> Optional[List[Tuple[int, int]]]:
    """The (first, stop) slot ranges of a CPU decode of one request, if its
    slots form at most MAX_SLOT_RUNS runs of consecutive slots (a lone request's
    usually do: its prefill took a run of free slots, each decode step the
    next one, and a cached prefix is one more run), else None. Found once per
    batch, used by every layer."""
    if kv_indices.device.type != "cpu" or kv_indices.shape[0] != 1 or not fb.forward_mode.is_decode():
        return None
    row = kv_indices[0]
    if len(row) == 0:
        return None
    breaks = ((row[1:] - row[:-1]) != 1).nonzero().flatten().tolist()
    if len(breaks) >= MAX_SLOT_RUNS:
        return None
    starts, stops = [0] + [b + 1 for b in breaks], [b + 1 for b in breaks] + [len(row)]
    first = row[starts].tolist()
    return [(f, f + stop - start) for f, start, stop in zip(first, starts, stops)]


def _from_runs(buf: torch.Tensor, runs: List[Tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
    """buf [slots, kv_heads, d] at the slot ranges `runs`, in order -> [1, kv_heads, L, d]
    in dtype: a view for one run; else each run copied (and cast) straight into
    the result, one pass over the keys where a gather and a cast take two."""
    if len(runs) == 1:
        first, stop = runs[0]
        return buf[first:stop].to(dtype).transpose(0, 1).unsqueeze(0)
    out = torch.empty(sum(stop - first for first, stop in runs), *buf.shape[1:], dtype=dtype, device=buf.device)
    at = 0
    for first, stop in runs:
        out[at:at + stop - first].copy_(buf[first:stop])
        at += stop - first
    return out.transpose(0, 1).unsqueeze(0)


def _gather(buf: torch.Tensor, kv_indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """buf [slots, kv_heads, d] at kv_indices [bs, L] -> [bs, kv_heads, L, d] in dtype."""
    bs, length = kv_indices.shape
    rows = _rows(buf, kv_indices.reshape(-1))
    return rows.view(bs, length, *buf.shape[1:]).to(dtype).transpose(1, 2)


def _heads(x: torch.Tensor, layer: "RadixAttention", num_heads: int | None = None) -> torch.Tensor:
    return x.view(x.shape[0], num_heads or layer.num_kv_heads, layer.head_dim)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
          layer: "RadixAttention", causal: bool = False) -> torch.Tensor:
    """SDPA over q [(bs,) heads, Q, d] and k, v [(bs,) kv_heads, L, d], all in
    one dtype, mask broadcastable to [(bs,) 1, Q, L] (True: visible), always as 4-D
    tensors: only those take the CPU's fused kernel (with or without a mask),
    which accumulates in float32 and reads strided keys in place. 3-D ones fall
    to the unfused path: for the default model, 4 queries over 300 keys took 172
    against 56 us a layer, 512 over 1,024 22 against 2.3 ms (2-core AMX Xeon, bf16)."""
    batched = q.dim() == 4
    if not batched:
        q, k, v = q[None], k[None], v[None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                         scale=layer.scaling, enable_gqa=layer.num_heads != layer.num_kv_heads)
    return out if batched else out[0]


def _decode_with_sinks(qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor],
                       layer: "RadixAttention") -> torch.Tensor:
    """A decode step with attention sinks, which SDPA lacks: qg [bs, kv_heads,
    group, d], keys and values [bs, kv_heads, L, d], mask [bs, 1, 1, L] or None.
    Returns [bs, heads * d] in the keys' dtype."""
    bs, kv_heads, group, _ = qg.shape
    keys, values, mask = pad_keys(keys, values, mask)  # (the CPU's bfloat16 matmuls: a new key count every step)
    # keys are a strided view of [slot, head, dim] rows: as the left operand the
    # library reads them in place, as a transposed right one it copied them first.
    scores = torch.matmul(keys, qg.transpose(2, 3)).transpose(2, 3) * layer.scaling  # [bs, kvh, group, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sinks = layer.sinks.view(1, kv_heads, group, 1).expand(bs, -1, -1, -1)
    probs = _softmax_with_sinks(scores, sinks).to(keys.dtype)
    return torch.matmul(probs, values).reshape(bs, -1)


def _tree_visible(bits: torch.Tensor, new_index: torch.Tensor) -> torch.Tensor:
    """A verify step of draft trees: which keys each new token sees. bits [Q]
    int64 (bit k: the request's k-th new token); new_index [1, L], each key's
    index among the new tokens (< 0: the cached prefix, which every query sees)."""
    shift = new_index.clamp(0, 63)
    return (new_index < 0) | (((bits[:, None] >> shift) & 1) != 0)


def _tree_positions(positions: torch.Tensor, key_pos: torch.Tensor, prefix: int):
    """(query positions [Q, 1], key positions [1, L]) of a tree's verify step:
    the new tokens at their given positions (prefix + depth), the prefix's
    keys at their own."""
    key_pos = key_pos.clone()
    key_pos[:, key_pos.shape[1] - len(positions):] = positions
    return positions[:, None], key_pos


def _softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """softmax over the keys (last axis) with one more logit per row, the sink,
    in the denominator only: the sink's column is dropped after the softmax.
    scores [..., L]; sinks broadcastable to [..., 1]. Float32 out."""
    logits = torch.cat([scores.float(), sinks.float().expand(*scores.shape[:-1], 1)], dim=-1)
    return torch.softmax(logits, dim=-1)[..., :-1]


def _attend_with_sinks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, layer: "RadixAttention"
) -> torch.Tensor:
    """Attention with sinks, which SDPA lacks. q [heads, Q, d]; k, v [kv_heads, L, d];
    mask [Q, L] (True: visible). Returns [heads, Q, d]."""
    group, count = layer.num_heads // layer.num_kv_heads, q.shape[1]
    k, v, mask = pad_keys(k, v, mask)  # (the CPU's bfloat16 matmuls: a few shapes, cpu_gemm_rows)
    q, mask = pad_queries(q, mask)
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    scores = torch.matmul(q, k.transpose(1, 2)) * layer.scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = _softmax_with_sinks(scores, layer.sinks.view(-1, 1, 1))
    return torch.matmul(probs.to(v.dtype), v)[:, :count]
