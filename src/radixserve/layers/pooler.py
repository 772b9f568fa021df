"""Embeddings of a decoder model: which hidden states make a sequence's vector
(the pooling the checkpoint declares), and how a prefill's chunks add up to it.

sentence-transformers checkpoints (Qwen3-Embedding, gte-Qwen2, ...) name their
pooling in `modules.json` -> `1_Pooling/config.json`; decoder embedding models
use the last token (the end-of-text token the tokenizer appends) or the mean of
every token. The vector is always L2-normalized, as those checkpoints' own
`Normalize` module and SGLang's pooler do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import torch

POOLING_METHODS = ("last", "mean")
# sentence-transformers' Pooling config keys -> our method names
_ST_POOLING_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean"}
_ST_POOLING_MODULE = "sentence_transformers.models.Pooling"


@dataclass(frozen=True)
class PoolingConfig:
    method: str  # "last" | "mean"

    @property
    def needs_every_token(self) -> bool:
        """Mean pooling reads every token's hidden state, so none may come from the prefix cache."""
        return self.method == "mean"


def read_pooling_config(folder: Optional[Path]) -> PoolingConfig:
    """The pooling `folder`'s sentence-transformers files declare; last-token
    without them. A mode we cannot serve (CLS, max, weighted mean) is a
    ValueError naming it, rather than vectors of another kind."""
    modules_file = Path(folder) / "modules.json" if folder is not None else None
    if modules_file is None or not modules_file.is_file():
        return PoolingConfig("last")
    modules = json.loads(modules_file.read_text())
    pooling = next((m for m in modules if m.get("type") == _ST_POOLING_MODULE), None)
    config_file = Path(folder) / pooling.get("path", "") / "config.json" if pooling else None
    if config_file is None or not config_file.is_file():
        return PoolingConfig("last")
    config = json.loads(config_file.read_text())
    chosen = [key for key, on in config.items() if key.startswith("pooling_mode_") and on]
    if len(chosen) != 1 or chosen[0] not in _ST_POOLING_MODES:
        raise ValueError(f"{config_file}: pooling {chosen} is not supported for embeddings; "
                         f"supported: {', '.join(_ST_POOLING_MODES)}")
    return PoolingConfig(_ST_POOLING_MODES[chosen[0]])


@dataclass
class EmbeddingOutput:
    """What an embedding model's extend forward returns instead of logits: per
    request of the batch, its last new token's hidden state and (mean pooling)
    the sum of its new tokens' hidden states, both float32 [bs, hidden]."""

    last_hidden: torch.Tensor
    sum_hidden: Optional[torch.Tensor]


def pool_extend(hidden: torch.Tensor, extend_seq_lens: torch.Tensor, last_rows: torch.Tensor,
                config: PoolingConfig) -> EmbeddingOutput:
    """hidden [num_tokens, H] of one extend batch (requests' new tokens back to
    back); last_rows: each request's last row in it."""
    last = hidden[last_rows].float()
    if not config.needs_every_token:
        return EmbeddingOutput(last, None)
    owner = torch.repeat_interleave(torch.arange(len(extend_seq_lens), device=hidden.device), extend_seq_lens)
    sums = torch.zeros(len(extend_seq_lens), hidden.shape[1], dtype=torch.float32, device=hidden.device)
    return EmbeddingOutput(last, sums.index_add_(0, owner, hidden.float()))


class PooledState:
    """One request's pooling across the chunks of its prefill."""

    def __init__(self, config: PoolingConfig) -> None:
        self.config = config
        self.total: Optional[torch.Tensor] = None
        self.count = 0
        self.last: Optional[torch.Tensor] = None

    def add(self, out: EmbeddingOutput, row: int, num_tokens: int) -> None:
        self.last = out.last_hidden[row]
        if out.sum_hidden is not None:
            part = out.sum_hidden[row]
            self.total = part if self.total is None else self.total + part
            self.count += num_tokens

    def embedding(self) -> List[float]:
        vector = self.total / self.count if self.config.needs_every_token else self.last
        return normalize(vector).cpu().tolist()


def normalize(vector: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vector.float(), p=2.0, dim=-1)


def matryoshka_dimensions(config: Any) -> Optional[List[int]]:
    """The truncations a checkpoint was trained for (`matryoshka_dimensions` in
    its config.json), [] when it says `is_matryoshka` without a list (any size),
    None when it declares neither (no `dimensions` allowed)."""
    dims = getattr(config, "matryoshka_dimensions", None)
    if dims:
        return [int(d) for d in dims]
    return [] if getattr(config, "is_matryoshka", False) else None
