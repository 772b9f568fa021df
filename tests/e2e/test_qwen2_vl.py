"""Qwen2-VL, the second vision-language family (Qwen2.5-VL's pipeline with
LayerNorms, an fc1/fc2 MLP and no window attention), on a tiny random
checkpoint: greedy tokens equal transformers' for one and two images of
different sizes, with the chunked prefill splitting the image tokens."""

from __future__ import annotations

import pytest
import torch

from radixserve import Engine
from tests.conftest import assert_no_leak
from tests.vlm_models import IMAGE_PLACEHOLDER, build_tiny_qwen2_vl, hf_greedy_with_images, make_image, png_data_url

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(embedded_tokenizer_dir, tmp_path_factory):
    return build_tiny_qwen2_vl(embedded_tokenizer_dir, tmp_path_factory.mktemp("qwen2_vl"))


def test_images_match_transformers(model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    images = [make_image(200, 150, seed=1), make_image(120, 170, seed=2)]
    prompts = [f"Describe {IMAGE_PLACEHOLDER} briefly.", f"Compare {IMAGE_PLACEHOLDER} with {IMAGE_PLACEHOLDER}."]
    image_data = [png_data_url(images[0]), [png_data_url(images[1]), png_data_url(images[0])]]
    hf = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    want = [hf_greedy_with_images(hf, model_dir, prompts[0], images[:1], NEW_TOKENS),
            hf_greedy_with_images(hf, model_dir, prompts[1], [images[1], images[0]], NEW_TOKENS)]
    with Engine(model_path=str(model_dir), dtype="float32", chunked_prefill_size=16, log_level="warning") as engine:
        got = engine.generate(prompt=prompts, image_data=image_data, sampling_params={
            "max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True})
        assert_no_leak(engine)
    assert [g["output_ids"] for g in got] == want
    assert all(g["meta_info"]["prompt_tokens"] > 16 for g in got)  # the chunked prefill split each prompt
