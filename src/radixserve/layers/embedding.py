"""Token embedding and the LM head (tied to the embedding or not), vocab-parallel.

Under tensor parallelism each rank holds a slice of the vocabulary (the vocab
padded up to a multiple of tp_size, so every slice is the same length; the
last one's padding rows stay zero). The embedding looks up the ids in its
slice, zeroes the others and sums the ranks' rows with one all-reduce; the LM
head computes its slice of the logits and all-gathers them, trimmed back to
the vocab size. At tp=1 both are today's single lookup and matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from radixserve.distributed import get_tp_group
from radixserve.layers.batch_invariant import invariant_linear
from radixserve.layers.cpu_gemm_rows import bucketed_linear
from radixserve.layers.sharding import ShardSlice, mark_sharded


def vocab_slice(vocab_size: int) -> ShardSlice:
    """This rank's rows of the vocabulary; `size` counts its real (unpadded) rows."""
    tp = get_tp_group()
    per_rank = -(-vocab_size // tp.world_size)
    start = min(tp.rank_in_group * per_rank, vocab_size)
    return ShardSlice(0, start, min(per_rank, vocab_size - start), vocab_size)


def _rows_per_rank(vocab_size: int) -> int:
    return -(-vocab_size // get_tp_group().world_size)


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp_group = get_tp_group()
        self.vocab = vocab_slice(vocab_size)
        self.weight = mark_sharded(nn.Parameter(torch.empty(_rows_per_rank(vocab_size), hidden_size)), self.vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group.world_size == 1:
            return nn.functional.embedding(input_ids, self.weight)
        local = input_ids - self.vocab.start
        elsewhere = (local < 0) | (local >= self.vocab.size)
        rows = nn.functional.embedding(local.masked_fill(elsewhere, 0), self.weight)
        return self.tp_group.all_reduce(rows.masked_fill(elsewhere.unsqueeze(-1), 0))


class LMHead(nn.Module):
    batch_invariant = False  # set by the model runner under --enable-deterministic-inference
    # A quantized copy of the weight (layers/quantization.py), which the forward
    # reads instead; the weight stays (a tied embedding reads it).
    weight_format = None

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp_group = get_tp_group()
        self.vocab_size = vocab_size
        self.weight = mark_sharded(nn.Parameter(torch.empty(_rows_per_rank(vocab_size), hidden_size)),
                                   vocab_slice(vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in float32, whatever the weights' dtype; every rank gets all of them."""
        if self.weight_format is not None:
            logits = self.weight_format.matmul(hidden, self.qweight, self.qscale, None).float()
        elif self.batch_invariant:
            logits = invariant_linear(hidden, self.weight).float()
        else:
            logits = bucketed_linear(hidden, self.weight).float()  # (a prefill's logprob rows vary)
        if self.tp_group.world_size == 1:
            return logits
        return self.tp_group.all_gather(logits, dim=-1)[..., :self.vocab_size]
