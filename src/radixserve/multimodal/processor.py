"""Image preprocessing in the front end (a tokenizer thread, off the event
loop): images decoded, resized and normalized by the model's own transformers
processor (the PIL one: torchvision does not import here), each image
placeholder expanded to the image's token count, and the multimodal rotary
positions computed.

Image tokens are keyed by content: every token of an image gets the id
vocab_size + (a hash of its preprocessed pixels), so the radix cache matches
the same image in a later request and never a different one; the model
replaces those ids' embeddings with the vision encoder's output.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch

from radixserve.managers.validation import FieldError
from radixserve.multimodal.image_loader import decode_image, load_image_bytes
from radixserve.multimodal.inputs import MultimodalInputs

KEY_SPACE = 1 << 40  # image keys live in [vocab_size, vocab_size + KEY_SPACE)


class ImageProcessor:
    """The Qwen2-VL / Qwen2.5-VL family's image processing for one checkpoint."""

    def __init__(self, folder: Path, config: Any) -> None:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.hf = Qwen2VLImageProcessorPil.from_pretrained(folder)
        self.image_token_id = config.image_token_id
        self.merge = config.vision_config.spatial_merge_size
        self.vocab_size = config.get_text_config().vocab_size
        self.placeholder = ""  # the text that stands for one image in a prompt (set by image_processor_for)

    @classmethod
    def for_model(cls, folder: Path, config: Any) -> Optional["ImageProcessor"]:
        """The processor when the checkpoint is a vision-language model we serve, else None."""
        if getattr(config, "vision_config", None) is None or getattr(config, "image_token_id", None) is None:
            return None
        return cls(folder, config)

    def process(self, ids: List[int], sources: Sequence[str], field: str) -> Tuple[List[int], MultimodalInputs]:
        """The prompt's ids with each image placeholder expanded into its image's
        keyed tokens, and the inputs the scheduler needs. FieldError(field...)
        for an image that cannot be read or a placeholder count that differs."""
        pads = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(pads) != len(sources):
            raise FieldError(field, f"'{field}' has {len(sources)} image(s) but the prompt has {len(pads)} image "
                                    f"placeholder(s); each image needs one")
        images = [decode_image(load_image_bytes(s, f"{field}[{i}]"), f"{field}[{i}]") for i, s in enumerate(sources)]
        out = self.hf(images=images, return_tensors="pt")
        pixels, grids = out["pixel_values"], [tuple(g) for g in out["image_grid_thw"].tolist()]
        counts = [t * h * w // (self.merge * self.merge) for t, h, w in grids]
        expanded, spans, start = [], [], 0
        for pad, count, key in zip(pads, counts, self._keys(pixels, grids)):
            expanded += ids[start:pad]
            spans.append((len(expanded), count))
            expanded += [key] * count
            start = pad + 1
        expanded += ids[start:]
        positions, delta = self._mrope_positions(len(expanded), spans, grids)
        return expanded, MultimodalInputs(pixels, grids, spans, positions, delta)

    def _keys(self, pixels: torch.Tensor, grids: Sequence[Tuple[int, int, int]]) -> List[int]:
        keys, row = [], 0
        for t, h, w in grids:
            patch = pixels[row:row + t * h * w].contiguous()
            digest = hashlib.sha256(repr((t, h, w)).encode() + patch.numpy().tobytes()).digest()
            keys.append(self.vocab_size + int.from_bytes(digest[:8], "little") % KEY_SPACE)
            row += t * h * w
        return keys

    def _mrope_positions(self, length: int, spans: Sequence[Tuple[int, int]],
                         grids: Sequence[Tuple[int, int, int]]) -> Tuple[torch.Tensor, int]:
        """Text tokens count up on all three axes; an image's tokens take
        (frame, row, column) of its merged grid, offset by the position it
        starts at; the text after it resumes past the image's largest side."""
        parts, pos, cursor = [], 0, 0
        for (first, count), (t, h, w) in zip(spans, grids):
            parts.append(torch.arange(first - cursor).expand(3, -1) + pos)
            pos += first - cursor
            gh, gw = h // self.merge, w // self.merge
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij"))
            parts.append(grid.reshape(3, -1) + pos)
            pos += max(gh, gw)
            cursor = first + count
        parts.append(torch.arange(length - cursor).expand(3, -1) + pos)
        positions = torch.cat(parts, dim=1)
        return positions, int(positions.max()) + 1 - length


def image_processor_for(model_path: str, tokenizer: Any) -> Optional[ImageProcessor]:
    """The served checkpoint's image processor, None for a text-only model."""
    from radixserve.model_loader.source import resolve_model_source
    from radixserve.utils.hf_utils import load_config

    source = resolve_model_source(model_path)
    if source.kind != "hf":
        return None
    config = load_config(source)
    processor = ImageProcessor.for_model(source.folder, config)
    if processor is not None:
        processor.placeholder = "".join(tokenizer.convert_ids_to_tokens(
            [config.vision_start_token_id, config.image_token_id, config.vision_end_token_id]))
    return processor


def add_images(processor: Optional[ImageProcessor], ids: List[int], images: Optional[List[str]],
               context_len: int) -> Tuple[List[int], Optional[MultimodalInputs]]:
    """A checked prompt's ids with its images (image_data) expanded in; FieldError
    naming image_data for a text-only model or a prompt the images make too long."""
    if not images:
        return ids, None
    if processor is None:
        raise FieldError("image_data", "image_data: this model takes no images "
                                       "(it is not a vision-language model we serve)")
    expanded, mm = processor.process(ids, images, "image_data")
    if len(expanded) >= context_len:
        raise FieldError("image_data", f"with its images the prompt has {len(expanded)} tokens "
                                       f"({mm.num_image_tokens} for images), more than the context length allows "
                                       f"({context_len} tokens including at least one generated)")
    return expanded, mm
