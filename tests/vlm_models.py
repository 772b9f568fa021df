"""Tiny random Qwen2.5-VL and Qwen2-VL checkpoints built with transformers (the embedded
model's tokenizer plus Qwen's vision tokens, the PIL image processor with
small pixel limits), images to send it, and transformers' own greedy output
for prompts with images: the reference the VLM tests compare against."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path
from typing import List, Tuple

import torch

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
# Small images keep the CPU test fast: at most 16x16 patches (64 image tokens).
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 64


def build_tiny_qwen2_5_vl(tokenizer_dir: Path, out_dir: Path) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                  in_channels=3)
    return _build_tiny_vlm(tokenizer_dir, out_dir, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, vision)


def build_tiny_qwen2_vl(tokenizer_dir: Path, out_dir: Path) -> Path:
    """Qwen2-VL: the vision config names its width embed_dim and its output hidden_size."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=3, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu")
    return _build_tiny_vlm(tokenizer_dir, out_dir, Qwen2VLConfig, Qwen2VLForConditionalGeneration, vision)


def _build_tiny_vlm(tokenizer_dir: Path, out_dir: Path, config_cls, model_cls, vision: dict) -> Path:
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=tok.bos_token_id or 1, eos_token_id=2)
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # random init leaves some weights at zero/one: make every part matter
        for name, p in model.named_parameters():
            if "norm" not in name and "ln_q" not in name:
                p.normal_(0, 0.15)  # large enough that greedy outputs do not settle into a loop
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(out_dir)
    for f in ("chat_template.jinja",):
        if (Path(tokenizer_dir) / f).is_file():
            shutil.copy(Path(tokenizer_dir) / f, out_dir / f)
    return out_dir


def make_image(width: int, height: int, seed: int):
    """A random RGB image (PIL)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def hf_inputs(model_dir: Path, prompt: str, images: List) -> Tuple[torch.Tensor, dict]:
    """transformers' inputs for a prompt whose IMAGE_PLACEHOLDERs stand for images:
    each image pad expanded to its merged-token count, as Qwen's processor does."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(model_dir)
    proc = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    pix = proc(images=images, return_tensors="pt")
    counts = (pix["image_grid_thw"].prod(-1) // 4).tolist()
    parts = prompt.split("<|image_pad|>")
    text = parts[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, parts[1:]))
    ids = torch.tensor([tok.encode(text)])
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    return ids, {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"],
                 "mm_token_type_ids": (ids == pad).int()}


@torch.no_grad()
def hf_greedy_with_images(model, model_dir: Path, prompt: str, images: List, new_tokens: int) -> List[int]:
    ids, extra = hf_inputs(model_dir, prompt, images)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
    return out[0, ids.shape[1]:].tolist()
