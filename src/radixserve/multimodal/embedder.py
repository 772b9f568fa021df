"""The vision encoder's rows for one forward (in the scheduler process).

An extend chunk may hold all, part or none of a request's image tokens (a
chunked prefill splits them; a radix hit skips them). The encoder runs once
per request, at the first chunk that needs its images (one call for every
such request of the batch), and its output is kept on the request's
MultimodalInputs until its prefill is done."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from radixserve.multimodal.inputs import MultimodalInputs

# (a request's inputs, first position of this forward, end position)
MultimodalItem = Tuple[MultimodalInputs, int, int]


def image_embeds_for(model: Any, items: List[MultimodalItem], device: torch.device) -> Optional[torch.Tensor]:
    """The embeddings of the image tokens among the forward's input ids, in order."""
    encode_missing(model, [mm for mm, start, end in items if mm.embeds is None and mm.image_rows(start, end)[1]],
                   device)
    rows = []
    for mm, start, end in items:
        first, count = mm.image_rows(start, end)
        if count:
            rows.append(mm.embeds[first:first + count])
        if end >= mm.mrope_positions.shape[1]:
            mm.embeds = None  # the prompt is done: its images are in the KV cache now
    return torch.cat(rows) if rows else None


def encode_missing(model: Any, todo: List[MultimodalInputs], device: torch.device) -> None:
    """One vision-encoder call for every request of the batch that needs its images now."""
    if not todo:
        return
    pixels = torch.cat([mm.pixel_values for mm in todo]).to(device)
    embeds = model.encode_images(pixels, [grid for mm in todo for grid in mm.grids])
    for mm, part in zip(todo, embeds.split([mm.num_image_tokens for mm in todo])):
        mm.embeds = part
