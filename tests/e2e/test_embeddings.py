"""--is-embedding end to end: vectors through Engine.encode, /v1/embeddings
(httpx and the openai client) and /encode equal transformers' pooling of the
same weights' hidden states (last-token and mean), with chunked prefills and
the prefix cache in play; bad input is a 400 / ValueError naming the field.
(A generative server refusing /v1/embeddings: tests/e2e/test_vision_language.py.)"""

from __future__ import annotations

import base64

import httpx
import pytest
import torch

from tests.conftest import assert_no_leak, tiny_config
from tests.embedding_models import cosine, hf_embeddings, load_hf_encoder, save_embedding_model
from tests.server_utils import MODEL, running_server

CHUNK = 8  # --chunked-prefill-size: the long prompts below span several chunks
TEXTS = ["hello world",
         "The quick brown fox jumps over the lazy dog, then runs far away across the green hills to the river."]


@pytest.fixture(scope="module")
def tokenizer(embedded_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_tokenizer_dir)


@pytest.fixture(scope="module")
def qwen3_last(embedded_tokenizer_dir, tokenizer, tmp_path_factory):
    """Qwen3-Embedding's layout: a bare Qwen3Model, last-token pooling, matryoshka sizes."""
    config = tiny_config("qwen3", len(tokenizer), bos=tokenizer.bos_token_id or 1, eos=2)
    config.matryoshka_dimensions = [16, 32]
    return save_embedding_model(config, tmp_path_factory.mktemp("qwen3emb"), "last", embedded_tokenizer_dir,
                                bare_decoder=True)


@pytest.fixture(scope="module")
def llama_mean(embedded_tokenizer_dir, tokenizer, tmp_path_factory):
    """A causal-LM checkpoint (LM head included) pooled by its mean."""
    config = tiny_config("llama", len(tokenizer), bos=tokenizer.bos_token_id or 1, eos=2)
    return save_embedding_model(config, tmp_path_factory.mktemp("llamaemb"), "mean", embedded_tokenizer_dir,
                                bare_decoder=False)


@pytest.fixture(scope="module")
def engine(qwen3_last):
    from radixserve import Engine

    # page_size=1: the tests count token-exact prefix hits (the CPU default page is 16)
    eng = Engine(str(qwen3_last), is_embedding=True, chunked_prefill_size=CHUNK, page_size=1)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(llama_mean):
    with running_server(llama_mean, "--is-embedding", "--chunked-prefill-size", str(CHUNK)) as (_, base):
        yield base


# ---- Engine.encode, last-token pooling ----

def test_encode_matches_transformers_last_token(engine, qwen3_last, tokenizer):
    prompts = [tokenizer.encode(t) for t in TEXTS]
    assert len(prompts[1]) > 2 * CHUNK  # its prefill takes several chunks
    expected = hf_embeddings(load_hf_encoder(qwen3_last), prompts, "last")
    by_text = engine.encode(TEXTS)
    by_ids = engine.encode(input_ids=prompts)
    single = engine.encode(TEXTS[1])
    for i in range(2):
        assert len(by_text[i]["embedding"]) == 64
        assert cosine(by_text[i]["embedding"], expected[i]) >= 0.9999
        assert cosine(by_ids[i]["embedding"], expected[i]) >= 0.9999
        assert by_text[i]["meta_info"]["prompt_tokens"] == len(prompts[i])
    assert cosine(single["embedding"], expected[1]) >= 0.9999
    assert abs(float(torch.tensor(single["embedding"]).norm()) - 1.0) < 1e-5
    # the same prompt again: every token but the last comes from the radix cache, same vector
    assert single["meta_info"]["cached_tokens"] == len(prompts[1]) - 1
    assert cosine(single["embedding"], by_text[1]["embedding"]) >= 0.99999
    assert_no_leak(engine)


def test_encode_matryoshka_dimensions(engine, qwen3_last, tokenizer):
    full = hf_embeddings(load_hf_encoder(qwen3_last), [tokenizer.encode(TEXTS[0])], "last")[0]
    short = engine.encode(TEXTS[0], dimensions=16)["embedding"]
    assert len(short) == 16
    assert cosine(short, torch.nn.functional.normalize(full[:16], dim=0)) >= 0.9999
    with pytest.raises(ValueError, match="dimensions must be one of"):
        engine.encode(TEXTS[0], dimensions=20)


def test_engine_refuses_bad_embedding_input(engine):
    with pytest.raises(ValueError, match="'prompt' is empty"):
        engine.encode("")
    with pytest.raises(ValueError, match=r"'prompt\[1\]' is empty"):
        engine.encode(["a", ""])
    with pytest.raises(ValueError, match="serves embeddings"):
        engine.generate("hello", {"max_new_tokens": 2})
    assert engine.encode("still serving")["embedding"]
    assert_no_leak(engine)


# ---- HTTP, mean pooling ----

def test_v1_embeddings_mean_pooling_matches_transformers(server, llama_mean, tokenizer):
    prompts = [tokenizer.encode(t) for t in TEXTS]
    expected = hf_embeddings(load_hf_encoder(llama_mean), prompts, "mean")
    body = httpx.post(f"{server}/v1/embeddings", json={"model": MODEL, "input": TEXTS}, timeout=60).json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert body["usage"] == {"prompt_tokens": sum(map(len, prompts)), "total_tokens": sum(map(len, prompts))}
    for i, item in enumerate(body["data"]):
        assert item["object"] == "embedding" and item["index"] == i
        assert cosine(item["embedding"], expected[i]) >= 0.9999
    # token ids, one list and a list of lists; base64-encoded float32
    one = httpx.post(f"{server}/v1/embeddings", json={"input": prompts[1], "encoding_format": "base64"},
                     timeout=60).json()
    raw = torch.frombuffer(bytearray(base64.b64decode(one["data"][0]["embedding"])), dtype=torch.float32)
    assert cosine(raw, expected[1]) >= 0.9999
    many = httpx.post(f"{server}/v1/embeddings", json={"input": prompts}, timeout=60).json()
    assert [cosine(d["embedding"], e) >= 0.9999 for d, e in zip(many["data"], expected)] == [True, True]


def test_openai_client_and_native_encode(server, llama_mean, tokenizer):
    import openai

    expected = hf_embeddings(load_hf_encoder(llama_mean), [tokenizer.encode(TEXTS[1])], "mean")[0]
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none")
    got = client.embeddings.create(model=MODEL, input=TEXTS[1])  # the client asks for base64 itself
    assert cosine(got.data[0].embedding, expected) >= 0.9999
    assert got.usage.prompt_tokens == len(tokenizer.encode(TEXTS[1]))
    native = httpx.post(f"{server}/encode", json={"text": TEXTS[1]}, timeout=60).json()
    assert cosine(native["embedding"], expected) >= 0.9999
    # mean pooling computes every token: a repeated prompt takes nothing from the cache
    assert native["meta_info"]["cached_tokens"] == 0


@pytest.mark.parametrize("path, body, field", [
    ("/v1/embeddings", {"input": ""}, "input"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": ["a", ""]}, "input"),
    ("/v1/embeddings", {"input": "a", "dimensions": 8}, "dimensions"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ("/encode", {"text": ""}, "text"),
    ("/generate", {"text": "hello"}, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "hello"}, "model"),
])
def test_embedding_server_refuses_bad_input(server, path, body, field):
    r = httpx.post(f"{server}{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.text
    assert httpx.post(f"{server}/encode", json={"text": "fine"}, timeout=60).status_code == 200
