"""Image preprocessing in the front end: M-RoPE positions against
transformers' own get_rope_index, content keys for the radix cache, which
encoder rows a chunk needs, and bad images refused naming the field."""

from __future__ import annotations

import pytest
import torch

from radixserve.managers.validation import FieldError
from radixserve.multimodal.processor import ImageProcessor, add_images
from tests.vlm_models import MAX_PIXELS, MIN_PIXELS, make_image, png_data_url

IMAGE_ID, START_ID, END_ID, VOCAB = 500, 501, 502, 600


@pytest.fixture(scope="module")
def config():
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                        "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_ID,
                            vision_start_token_id=START_ID, vision_end_token_id=END_ID, video_token_id=503)


@pytest.fixture(scope="module")
def processor(config, tmp_path_factory):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = tmp_path_factory.mktemp("processor")
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(folder)
    return ImageProcessor(folder, config)


def prompt(num_images: int):
    ids = [7, 8]
    for i in range(num_images):
        ids += [START_ID, IMAGE_ID, END_ID, 9 + i]
    return ids + [20, 21]


def test_positions_match_transformers_rope_index(processor, config):
    from transformers import Qwen2_5_VLModel

    images = [make_image(200, 150, 1), make_image(60, 120, 2)]
    ids, mm = processor.process(prompt(2), [png_data_url(i) for i in images], "image_data")
    hf = Qwen2_5_VLModel(config)
    ids_t = torch.tensor([ids])
    kinds = (ids_t >= VOCAB).int()  # image tokens carry their content key, past the vocabulary
    grid = torch.tensor(mm.grids)
    expected, delta = hf.get_rope_index(ids_t, kinds, image_grid_thw=grid)
    assert torch.equal(mm.mrope_positions, expected[:, 0])
    assert mm.rope_delta == int(delta)
    assert [n for _, n in mm.image_spans] == (grid.prod(-1) // 4).tolist()
    # generated tokens continue at index + delta on every axis
    assert mm.positions(len(ids), len(ids) + 2).tolist() == [[len(ids) + mm.rope_delta, len(ids) + 1 + mm.rope_delta]] * 3


def test_image_keys_follow_content(processor):
    same, other = make_image(90, 90, 5), make_image(90, 90, 6)
    ids, mm = processor.process(prompt(3), [png_data_url(same), png_data_url(other), png_data_url(same)], "x")
    keys = [ids[first] for first, _ in mm.image_spans]
    assert keys[0] == keys[2] != keys[1] and min(keys) >= VOCAB
    assert all(len(set(ids[f:f + n])) == 1 for f, n in mm.image_spans)


def test_image_rows_of_a_chunk(processor):
    ids, mm = processor.process(prompt(2), [png_data_url(make_image(90, 90, 5))] * 2, "x")
    (a, n), (b, m) = mm.image_spans
    assert mm.image_rows(0, a) == (0, 0)
    assert mm.image_rows(a + 1, b + 2) == (1, n - 1 + 2)  # the first image's tail and the second's head
    assert mm.image_rows(0, len(ids)) == (0, n + m)


@pytest.mark.parametrize("source, field, message", [
    ("https://example.com/a.png", "image_data[0]", "network"),
    ("data:image/png;base64,@@@", "image_data[0]", "does not decode"),
    ("data:image/png;base64,bm90IGFuIGltYWdl", "image_data[0]", "cannot be decoded"),
    ("/no/such/file.png", "image_data[0]", "cannot read"),
])
def test_bad_images_name_the_field(processor, source, field, message):
    with pytest.raises(FieldError, match=message) as e:
        processor.process(prompt(1), [source], "image_data")
    assert e.value.field == field


def test_refusals(processor):
    with pytest.raises(FieldError, match="placeholder") as e:
        processor.process(prompt(2), [png_data_url(make_image(60, 60, 1))], "image_data")
    assert e.value.field == "image_data"
    with pytest.raises(FieldError, match="takes no images") as e:
        add_images(None, [1, 2], ["/x.png"], context_len=100)
    assert e.value.field == "image_data"
    with pytest.raises(FieldError, match="context length") as e:
        add_images(processor, prompt(1), [png_data_url(make_image(200, 150, 1))], context_len=20)
    assert e.value.field == "image_data"
