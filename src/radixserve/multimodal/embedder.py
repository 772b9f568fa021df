"""The vision encoder's rows for one forward (in the scheduler process).

An extend chunk may hold all, part or none of a request's image tokens (a
chunked prefill splits them; a radix hit skips them). The encoder runs once
per request, at the first chunk that needs its images, and its output is
kept on the request's MultimodalInputs until its prefill is done."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from radixserve.multimodal.inputs import MultimodalInputs

# (a request's inputs, first position of this forward, end position)
MultimodalItem = Tuple[MultimodalInputs, int, int]


def image_embeds_for(model: Any, items: List[MultimodalItem], device: torch.device) -> Optional[torch.Tensor]:
    """The embeddings of the image tokens among the forward's input ids, in order."""
    rows = []
    for mm, start, end in items:
        first, count = mm.image_rows(start, end)
        if count:
            if mm.embeds is None:
                mm.embeds = model.encode_images(mm.pixel_values.to(device), mm.grids)
            rows.append(mm.embeds[first:first + count])
        if end >= mm.mrope_positions.shape[1]:
            mm.embeds = None  # the prompt is done: its images are in the KV cache now
    return torch.cat(rows) if rows else None
