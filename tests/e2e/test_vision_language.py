"""Qwen2.5-VL end to end on a tiny random checkpoint: greedy tokens equal
transformers' generate for prompts with one and two images of different
sizes, with the chunked prefill splitting the image tokens; a repeated image
is a radix-cache hit with the same output, a different one never is; the
openai client sends base64 images; bad images are a 400 naming the field."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.server_utils import MODEL, running_server, whole_pages
from tests.vlm_models import (
    IMAGE_PLACEHOLDER, build_tiny_qwen2_5_vl, hf_greedy_with_images, make_image, png_data_url)

CHUNK = 16  # --chunked-prefill-size: smaller than every test image's token count
CONTEXT = 100  # --context-length: three 35-token images (and their text) do not fit
NEW_TOKENS = 8
GREEDY = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(embedded_tokenizer_dir, tmp_path_factory):
    return build_tiny_qwen2_5_vl(embedded_tokenizer_dir, tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def server(model_dir):
    """--enable-mixed-chunk: a batch's image chunks share forwards with running decodes."""
    with running_server(model_dir, "--chunked-prefill-size", str(CHUNK), "--context-length", str(CONTEXT),
                        "--enable-mixed-chunk") as (_, base):
        yield base


@pytest.fixture(scope="module")
def images():
    """A 35-token and a 24-token image (14x10 and 8x12 patches after resizing)."""
    return [make_image(200, 150, seed=1), make_image(120, 170, seed=2)]


def generate(server: str, text: str, image_data, **extra) -> dict:
    body = {"text": text, "image_data": image_data, "sampling_params": GREEDY, **extra}
    r = httpx.post(f"{server}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_one_and_two_images_match_transformers(server, model_dir, hf_model, images):
    one = f"Describe {IMAGE_PLACEHOLDER} briefly."
    two = f"Compare {IMAGE_PLACEHOLDER} with {IMAGE_PLACEHOLDER}, please."
    # one batch: the text prompt decodes while the image prompts' chunks prefill
    text_only, got_one, got_two = generate(server, ["Hello", one, two], [
        None, png_data_url(images[0]), [png_data_url(images[1]), png_data_url(images[0])]])
    assert text_only["meta_info"]["completion_tokens"] == NEW_TOKENS
    info = httpx.get(f"{server}/get_server_info", timeout=30).json()
    assert info["num_mixed_batches"] > 0
    assert got_one["output_ids"] == hf_greedy_with_images(hf_model, model_dir, one, images[:1], NEW_TOKENS)
    assert got_two["output_ids"] == hf_greedy_with_images(hf_model, model_dir, two, images[::-1], NEW_TOKENS)
    # 35 + 24 image tokens plus text: the prefill took several chunks, splitting the images
    assert got_two["meta_info"]["prompt_tokens"] > 35 + 24 > 3 * CHUNK


def test_repeated_image_is_a_prefix_hit_and_another_image_is_not(server, images, tmp_path):
    text = f"Remember {IMAGE_PLACEHOLDER} and tell me about it."
    first = generate(server, text, png_data_url(images[1]))
    path = tmp_path / "same.png"  # the same image from a file this time: same content, same key
    images[1].save(path)
    again = generate(server, text, f"file://{path}")
    prompt_tokens = first["meta_info"]["prompt_tokens"]
    assert again["meta_info"]["cached_tokens"] == whole_pages(server, prompt_tokens - 1)
    assert again["output_ids"] == first["output_ids"]
    other = generate(server, text, png_data_url(make_image(120, 170, seed=3)))  # same size, other pixels
    assert other["meta_info"]["prompt_tokens"] == prompt_tokens
    assert other["meta_info"]["cached_tokens"] <= len("Remember ")  # at most the text before the image


def test_openai_client_sends_base64_images(server, model_dir, hf_model, images):
    """Two images in one message, as base64 data URLs."""
    import openai
    from transformers import AutoTokenizer

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none")
    content = [{"type": "text", "text": "Is"}, {"type": "image_url", "image_url": {"url": png_data_url(images[1])}},
               {"type": "text", "text": "like"},
               {"type": "image_url", "image_url": {"url": png_data_url(images[0]), "detail": "low"}}]
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                           max_tokens=NEW_TOKENS, temperature=0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = f"Is{IMAGE_PLACEHOLDER}like{IMAGE_PLACEHOLDER}"
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    expected = hf_greedy_with_images(hf_model, model_dir, rendered, images[::-1], NEW_TOKENS)
    expected_text = tok.decode(expected[:reply.usage.completion_tokens], skip_special_tokens=True)
    assert reply.choices[0].message.content == expected_text


@pytest.mark.parametrize("body, field", [
    ({"text": f"a {IMAGE_PLACEHOLDER}", "image_data": "data:image/png;base64,bm90IGFuIGltYWdl"}, "image_data[0]"),
    ({"text": f"a {IMAGE_PLACEHOLDER}", "image_data": "https://example.com/cat.png"}, "image_data[0]"),
    ({"text": "no placeholder", "image_data": "data:image/png;base64,AAAA"}, "image_data"),
])
def test_bad_images_are_refused_naming_the_field(server, body, field):
    r = httpx.post(f"{server}/generate", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_images_too_large_for_the_context_are_refused(server, images):
    text = "x " + IMAGE_PLACEHOLDER * 3
    r = httpx.post(f"{server}/generate", json={"text": text, "image_data": [png_data_url(images[0])] * 3}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image_data", r.text
    assert "context length" in r.json()["error"]["message"]
    bad_part = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": bad_part}]},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].image_url", r.text
    kv = httpx.get(f"{server}/get_server_info", timeout=30).json()["kv_cache"]
    assert kv["in_use_tokens"] == 0 and kv["total_tokens"] == kv["free_tokens"] + kv["cached_tokens"], kv


def test_generative_server_refuses_embeddings(server):
    """(here because this module's server is a generative one)"""
    r = httpx.post(f"{server}/v1/embeddings", json={"input": "hello"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    assert "--is-embedding" in r.json()["error"]["message"]
