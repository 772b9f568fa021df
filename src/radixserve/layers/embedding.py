"""Token embedding and the LM head (tied to the embedding or not)."""

from __future__ import annotations

import torch
from torch import nn

from radixserve.layers.batch_invariant import invariant_linear


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    batch_invariant = False  # set by the model runner under --enable-deterministic-inference

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in float32, whatever the weights' dtype."""
        if self.batch_invariant:
            return invariant_linear(hidden, self.weight).float()
        return nn.functional.linear(hidden, self.weight).float()
