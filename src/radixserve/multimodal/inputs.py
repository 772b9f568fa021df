"""MultimodalInputs: what a request with images carries from the front end to
the scheduler (pickled with its TokenizedGenerateReqInput)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch


@dataclass
class MultimodalInputs:
    pixel_values: torch.Tensor  # [patches, C*T*P*P], every image's patches back to back (the processor's)
    grids: List[Tuple[int, int, int]]  # (t, h, w) in patches, per image
    image_spans: List[Tuple[int, int]]  # (first position, token count) of each image in the prompt
    mrope_positions: torch.Tensor  # [3, prompt_len] int64: (time, height, width) per prompt token
    rope_delta: int  # a position past the prompt is its index + rope_delta (all three axes)
    # Scheduler side: the encoder's output for every image token, computed at
    # the first forward that needs it and dropped once the prefill is done.
    embeds: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def num_image_tokens(self) -> int:
        return sum(n for _, n in self.image_spans)

    def positions(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] positions of tokens start..end-1 (generated ones included)."""
        prompt_len = self.mrope_positions.shape[1]
        inside = self.mrope_positions[:, start:min(end, prompt_len)]
        if end <= prompt_len:
            return inside
        after = torch.arange(max(start, prompt_len), end) + self.rope_delta
        return torch.cat([inside, after.expand(3, -1)], dim=1)

    def image_rows(self, start: int, end: int) -> Tuple[int, int]:
        """Which rows of `embeds` the image tokens among positions start..end-1 are
        (image tokens are numbered in prompt order): (first row, count)."""
        before = inside = 0
        for first, count in self.image_spans:
            before += max(0, min(start, first + count) - first)
            inside += max(0, min(end, first + count) - max(start, first))
        return before, inside
