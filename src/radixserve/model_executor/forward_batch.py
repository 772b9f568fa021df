"""ForwardBatch: every device tensor one model forward needs.

The model runner's only input: the scheduler's ScheduleBatch builds it (see
ScheduleBatch.to_forward_batch) without knowing the attention backend; the
runner attaches its backend and has it set `attn_metadata` before the model
runs. Models and attention backends see only this object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, auto
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch

if TYPE_CHECKING:
    from radixserve.layers.attention.base import AttentionBackend
    from radixserve.mem_cache.allocator import KVPool, ReqToTokenPool


class ForwardMode(IntEnum):
    EXTEND = auto()  # prefill, possibly on top of a cached prefix, possibly a chunk
    DECODE = auto()  # one new token per request
    # Running requests' decode step and an extend batch in one forward; the
    # decode requests come first, each an extend of one token (--enable-mixed-chunk).
    MIXED = auto()

    def is_extend(self) -> bool:
        """Extend-shaped: per-request prefix and new-token lengths (MIXED too)."""
        return self != ForwardMode.DECODE

    def is_mixed(self) -> bool:
        return self == ForwardMode.MIXED

    def is_decode(self) -> bool:
        return self == ForwardMode.DECODE


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    req_pool_indices: torch.Tensor  # [bs] int64, rows of req_to_token
    seq_lens: torch.Tensor  # [bs] int64, length after this forward (prefix + new)
    out_cache_loc: torch.Tensor  # [num_tokens] int64, KV slots the new tokens fill
    seq_lens_cpu: List[int]

    # Extend only
    extend_prefix_lens: Optional[torch.Tensor] = None  # [bs]
    extend_seq_lens: Optional[torch.Tensor] = None  # [bs], new tokens per request
    extend_start_loc: Optional[torch.Tensor] = None  # [bs], offset in input_ids
    extend_prefix_lens_cpu: Optional[List[int]] = None
    extend_seq_lens_cpu: Optional[List[int]] = None

    # Which hidden states to turn into logits: for each request, logits of the
    # last new token always; of every new token from `logprob_start` on when it
    # asked for input logprobs. Indices into the [num_tokens] axis.
    logits_indices: Optional[torch.Tensor] = None
    # Extend only: the row of each request's last new token among the rows
    # logits_indices picks (its next-token logits). [bs] int64.
    last_logit_rows: Optional[torch.Tensor] = None
    # MIXED only: how many requests at the front are decode steps (one token
    # each, so also how many tokens); backends may attend to them apart.
    num_decode_rows: int = 0
    # Each request's LoRA adapter id (None: the base model), with --enable-lora.
    lora_ids: Optional[List[Optional[int]]] = None
    # Vision-language models, extend batches with images: (time, height, width)
    # positions [3, num_tokens] for M-RoPE, each request's images and the span
    # of positions this forward computes (multimodal/embedder.py), and the
    # image tokens' embeddings the runner fills from them.
    mrope_positions: Optional[torch.Tensor] = None
    mm_items: Optional[List[Any]] = None
    mm_embeds: Optional[torch.Tensor] = None

    # Speculative decoding. A target forward collects the outputs of these
    # layers for every token into aux_hidden ([T, layers x hidden]); a draft
    # head's forward reads spec_hidden (its input features per token); with
    # return_hidden the runner hands back the model's output hidden states.
    capture_aux_layers: Optional[Tuple[int, ...]] = None
    aux_hidden: Optional[torch.Tensor] = None
    spec_hidden: Optional[torch.Tensor] = None
    return_hidden: bool = False
    # A verify step of draft trees (speculative/tree.py), extend only: per new
    # token, the bits of the request's new tokens it sees (bit k: its k-th new
    # token); every token sees the whole cached prefix. None: causal.
    spec_tree_mask: Optional[torch.Tensor] = None
    # An extend whose rows are multiplied as a decode step's (quantization.decode_step):
    # a verify step's (each row then gets the logits a plain decode step would)
    # and an EAGLE head's draft forwards (whose rounding only moves drafts).
    as_decode_step: bool = False

    # Memory (the scheduler's pools) and kernels (attached by the model runner)
    req_to_token_pool: Optional["ReqToTokenPool"] = None
    kv_pool: Optional["KVPool"] = None
    attn_backend: Optional["AttentionBackend"] = None

    # Backend-private metadata set by attn_backend.init_forward_metadata
    attn_metadata: Any = field(default=None, repr=False)
