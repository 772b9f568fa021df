"""Multi-head latent attention (DeepSeek-V2/V3) over the latent KV cache.

Per token the cache holds only the normed latent c (kv_lora_rank) and the
rotated rope key k_pe (qk_rope_head_dim), shared by every head. kv_b_proj
decompresses c into each head's k_nope (= W_UK c) and v (= W_UV c). Two
equivalent ways to attend:

- absorbed: q_nope·k_nope = (W_UK^T q_nope)·c, so each query moves into the
  latent space and attends as MQA over [c | k_pe] (one KV head, key dim
  kv_lora_rank + rope, value c); the output comes back through W_UV. Reads only
  the cache: what decode and short extends need.
- expanded: decompress every key and value of the batch's requests and run
  ordinary multi-head attention (qk dim nope + rope, v dim v_head_dim). Fewer
  FLOPs per query-key pair, but the decompression costs per key.

`prefers_expanded` picks per batch by counting FLOPs. A prefill without a
cached prefix decompresses exactly its new tokens, which the absorbed form
pays for too (its per-query projections cost the same), so it always expands.
An extend on top of a cached prefix (radix hit, later chunks) expands the
prefix as well when its new tokens are many enough to repay that; short ones
stay absorbed. Decode is always absorbed (the CUDA-graph path).

The torch implementations of both attentions live here (the torch_native
backend uses them); mla_triton.py has the Triton kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.layers.cpu_gemm_rows import bucketed_linear, pad_keys, pad_queries
from radixserve.mem_cache.kv_dtype import as_cached

if TYPE_CHECKING:
    from radixserve.layers.attention.mla_backend import MLABackend
    from radixserve.model_executor.forward_batch import ForwardBatch

class MLAAttention(nn.Module):
    """The MLA layer models hold: dimensions and scale only; the backend attends."""

    def __init__(
        self, num_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
        kv_lora_rank: int, scaling: float, layer_id: int,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.kv_lora_rank = kv_lora_rank
        self.scaling = scaling
        self.layer_id = layer_id
        # "auto": chosen per batch by cost; "absorbed"/"expanded" force a form for
        # extends (decode is always absorbed). Both give the same result.
        self.form = "auto"

    def forward(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
        kv_b_weight: torch.Tensor, forward_batch: "ForwardBatch", cached: bool = False,
    ) -> torch.Tensor:
        """q_nope [T, H, nope], q_pe [T, H, rope] (rotated), latent [T, kv_lora_rank]
        (normed), k_pe [T, rope] (rotated), kv_b_weight [H*(nope+v), kv_lora_rank]
        -> [T, H, v_head_dim]. Writes latent|k_pe into the cache, unless
        `cached` (fused_latent_kv wrote them)."""
        return forward_batch.attn_backend.forward_mla(q_nope, q_pe, latent, k_pe, kv_b_weight, self, forward_batch,
                                                      cached)

    def fused_latent_kv(
        self, positions: torch.Tensor, q_pe: torch.Tensor, kv_a: torch.Tensor, kv_a_norm: nn.Module,
        rotary: nn.Module, interleaved: bool, forward_batch: "ForwardBatch",
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """On CUDA, one kernel for what comes between the projections and
        attention: q_pe [T, H, rope] rotated, kv_a = [latent | k_pe] split, the
        latent normed by kv_a_norm (an RMSNorm), k_pe rotated, and both written
        to this layer's cache rows (call forward with cached=True). Returns
        (q_pe [T, H, rope], latent, k_pe), or None where the model's torch
        ops must run (off CUDA, or views the kernel does not take)."""
        pool = forward_batch.kv_pool
        if not (kv_a.is_cuda and q_pe.stride(-1) == 1 and kv_a.stride(-1) == 1 and hasattr(pool, "latent_buffers")):
            return None
        from radixserve.layers.fused_kernels import mla_latent_kv  # Triton: imported where it runs

        q_pe, latent, k_pe = mla_latent_kv(
            positions, q_pe, kv_a, kv_a_norm.weight, kv_a_norm.eps, rotary.cos_sin_cache, interleaved,
            forward_batch.out_cache_loc, pool.latent_buffers[self.layer_id])
        return q_pe.view(q_pe.shape[0], self.num_heads, self.qk_rope_head_dim), latent, k_pe

    def split_kv_b(self, kv_b_weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, lora], W_UV [H, v, lora]): views, so weight updates apply at once."""
        w = kv_b_weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]


def mla_forward(
    backend: "MLABackend", q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
    k_pe: torch.Tensor, kv_b_weight: torch.Tensor, layer: MLAAttention, fb: "ForwardBatch", cached: bool = False,
) -> torch.Tensor:
    """MLA for any MLABackend: its `mla_attend_latent` and `mla_attend_expanded`
    attend. cached: latent|k_pe are in the cache already."""
    if not cached:
        fb.kv_pool.set_mla_kv(layer.layer_id, fb.out_cache_loc, latent, k_pe)
    if prefers_expanded(layer, fb):
        return _expanded(backend, q_nope, q_pe, latent, k_pe, kv_b_weight, layer, fb)
    w_uk, w_uv = layer.split_kv_b(kv_b_weight)
    q_latent = _query_to_latent(q_nope, w_uk)  # [T, H, lora]
    out_latent = backend.mla_attend_latent(q_latent, q_pe, layer, fb)  # [T, H, lora]
    return _latent_to_value(out_latent, w_uv)


def _query_to_latent(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_nope [T, H, nope] @ W_UK [H, nope, lora] per head -> [T, H, lora]."""
    if q_nope.is_cuda:
        from radixserve.layers.attention import mla_absorb  # Triton: imported where it runs

        if mla_absorb.takes(q_nope, w_uk):
            return mla_absorb.query_to_latent(q_nope, w_uk)
    return torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)


def _latent_to_value(out_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """W_UV [H, v, lora] @ out_latent [T, H, lora] per head -> [T, H, v], contiguous."""
    if out_latent.is_cuda:
        from radixserve.layers.attention import mla_absorb

        if mla_absorb.takes(out_latent, w_uv):
            return mla_absorb.latent_to_value(out_latent, w_uv)
    # Written through a transposed view: [T, H, v] comes out contiguous, and the
    # o projection's [T, H*v] input is a view, not one more copy.
    out = out_latent.new_empty(out_latent.shape[:2] + (w_uv.shape[1],))
    torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))
    return out


def prefers_expanded(layer: MLAAttention, fb: "ForwardBatch") -> bool:
    """Whether this batch runs the expanded form (see the module docstring)."""
    if fb.forward_mode.is_decode():
        return False
    if layer.form != "auto":
        return layer.form == "expanded"
    lora, rope = layer.kv_lora_rank, layer.qk_rope_head_dim
    nope, v = layer.qk_nope_head_dim, layer.v_head_dim
    new = sum(fb.extend_seq_lens_cpu)
    keys = sum(fb.extend_prefix_lens_cpu) + new
    # Query-key pairs under the causal mask.
    pairs = sum(e * p + e * (e + 1) // 2 for p, e in zip(fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu))
    absorbed = new * lora * (nope + v) + pairs * (2 * lora + rope)  # per head, multiply-adds
    expanded = keys * lora * (nope + v) + pairs * (nope + rope + v)
    return expanded <= absorbed


def _expanded(
    backend: "MLABackend", q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
    k_pe: torch.Tensor, kv_b_weight: torch.Tensor, layer: MLAAttention, fb: "ForwardBatch",
) -> torch.Tensor:
    if any(fb.extend_prefix_lens_cpu):
        latent, k_pe, kv_start_loc = gather_request_latents(layer, fb, latent.dtype)
    else:  # the new tokens are every key: no cache read, but the values the cache holds
        kv_start_loc = fb.extend_start_loc
        cache_dtype = fb.kv_pool.latent_buffers[layer.layer_id].dtype
        latent, k_pe = as_cached(latent, cache_dtype), as_cached(k_pe, cache_dtype)
    kv = bucketed_linear(latent, kv_b_weight).view(latent.shape[0], layer.num_heads, -1)
    k_nope, v = kv.split([layer.qk_nope_head_dim, layer.v_head_dim], dim=-1)
    return backend.mla_attend_expanded(q_nope, q_pe, k_nope, k_pe, v, kv_start_loc, layer, fb)


def gather_request_latents(
    layer: MLAAttention, fb: "ForwardBatch", dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every position of every request (prefix and new) from the cache, in dtype, packed
    request after request: (latent [S, lora], k_pe [S, rope], start of each request [bs])."""
    seq_lens = fb.seq_lens
    total = sum(fb.seq_lens_cpu)  # host-known: no device sync for the output size
    kv_start_loc = torch.cumsum(seq_lens, 0) - seq_lens
    rows = torch.repeat_interleave(fb.req_pool_indices, seq_lens, output_size=total)
    positions = torch.arange(total, device=seq_lens.device) - torch.repeat_interleave(
        kv_start_loc, seq_lens, output_size=total
    )
    slots = fb.req_to_token_pool.req_to_token[rows, positions]
    cached = fb.kv_pool.latent_buffers[layer.layer_id][slots, 0].to(dtype)  # widened from an FP8 cache
    return cached[:, : layer.kv_lora_rank], cached[:, layer.kv_lora_rank:], kv_start_loc


# ---- the torch implementations (torch_native backend) ----

def latent_attention_torch(q_latent: torch.Tensor, q_pe: torch.Tensor, layer: MLAAttention,
                           fb: "ForwardBatch") -> torch.Tensor:
    """Absorbed attention over the cache: q [T, H, lora] | [T, H, rope] against
    [latent | k_pe] of every visible position, values the latent -> [T, H, lora]."""
    q = torch.cat([q_latent, q_pe.to(q_latent.dtype)], dim=-1)
    buf = fb.kv_pool.latent_buffers[layer.layer_id]
    table = fb.req_to_token_pool.req_to_token
    lora = layer.kv_lora_rank
    if fb.forward_mode.is_decode():
        max_len = max(fb.seq_lens_cpu)
        slots = table[fb.req_pool_indices, :max_len]
        keys = buf[slots, 0].to(q.dtype)  # [bs, L, lora + rope]
        valid = torch.arange(max_len, device=q.device)[None, :] < fb.seq_lens[:, None]
        # zero keys up to a key count the CPU's bfloat16 matmuls have met before, masked
        keys, _, valid = pad_keys(keys, mask=valid)
        scores = torch.einsum("bhd,bld->bhl", q, keys) * layer.scaling
        probs = torch.softmax(scores.float().masked_fill(~valid[:, None, :], float("-inf")), dim=-1)
        return torch.einsum("bhl,bld->bhd", probs.to(q.dtype), keys[..., :lora])
    out = torch.empty(q.shape[:2] + (lora,), dtype=q.dtype, device=q.device)
    start = 0
    for row, prefix, extend in _requests(fb):
        seq = prefix + extend
        keys = buf[table[row, :seq], 0].to(q.dtype)  # [seq, lora + rope]
        keys, _, visible = pad_keys(keys, mask=_causal(prefix, seq, q.device))  # (as in decode)
        qi, visible = pad_queries(q[start:start + extend].transpose(0, 1), visible)  # [H, extend+, lora + rope]
        scores = (qi @ keys.T) * layer.scaling
        probs = torch.softmax(scores.float().masked_fill(~visible, float("-inf")), -1)
        out[start:start + extend] = (probs.to(q.dtype) @ keys[:, :lora])[:, :extend].transpose(0, 1)
        start += extend
    return out


def expanded_attention_torch(
    q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
    kv_start_loc: torch.Tensor, layer: MLAAttention, fb: "ForwardBatch",
) -> torch.Tensor:
    """Ordinary causal MHA of the new tokens over their request's keys, packed per
    request from kv_start_loc: q [T, H, nope|rope], k_nope [S, H, nope], k_pe [S, rope]
    (shared by the heads), v [S, H, v] -> [T, H, v]."""
    q = torch.cat([q_nope, q_pe.to(q_nope.dtype)], dim=-1)
    starts = kv_start_loc.tolist()  # extend only: a host copy is fine here
    out = q.new_empty(q.shape[:2] + (layer.v_head_dim,))
    start = 0
    for i, (_, prefix, extend) in enumerate(_requests(fb)):
        seq, first = prefix + extend, starts[i]
        ki = torch.cat([k_nope[first:first + seq],
                        k_pe[first:first + seq, None, :].expand(-1, layer.num_heads, -1).to(q.dtype)], dim=-1)
        oi = F.scaled_dot_product_attention(
            q[start:start + extend].transpose(0, 1), ki.transpose(0, 1), v[first:first + seq].transpose(0, 1),
            attn_mask=_causal(prefix, seq, q.device), scale=layer.scaling,
        )
        out[start:start + extend] = oi.transpose(0, 1)
        start += extend
    return out


def _requests(fb: "ForwardBatch"):
    """(request-table row, prefix length, new tokens) of each request of an extend batch."""
    rows = fb.req_pool_indices.tolist()
    return zip(rows, fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu)


def _causal(prefix: int, seq: int, device: torch.device) -> torch.Tensor:
    """[seq - prefix, seq]: new token j sits at position prefix + j and sees keys 0..prefix + j."""
    return torch.arange(seq, device=device)[None, :] <= torch.arange(prefix, seq, device=device)[:, None]
