"""The embedding routes: OpenAI's /v1/embeddings and SGLang's native /encode
(and /v1/embeddings' response shape). They answer on an --is-embedding server;
on a generative one they refuse with 400 naming `model`."""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Dict, List

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from radixserve.managers.embedding_input import (
    ENCODING_FORMATS, EmbeddingReqInput, encode_base64, encode_request)
from radixserve.managers.validation import FieldError

JsonReader = Callable[[Request], Awaitable[dict]]
# SGLang's /encode fields we act on; `image_data` and the rest are refused, not ignored.
NATIVE_ENCODE_FIELDS = ("text", "input_ids", "rid", "dimensions")
OPENAI_EMBEDDING_FIELDS = ("input", "model", "dimensions", "encoding_format", "user")


def add_embedding_routes(app: FastAPI, state: Any, serving: Any, read_json: JsonReader) -> None:
    """state: the server's ServerState; serving: its OpenAIServing (checks `model`)."""

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body = known_fields(await read_json(request), OPENAI_EMBEDDING_FIELDS)
        if "input" not in body:
            raise FieldError("input", "'input' is required: a string, a list of strings, token ids "
                                      "or a list of token-id lists")
        serving.check_model(body.get("model"))
        fmt = body.get("encoding_format") or "float"
        if fmt not in ENCODING_FORMATS:
            raise FieldError("encoding_format", f"encoding_format must be one of {'|'.join(ENCODING_FORMATS)}, "
                                                f"got {fmt!r}")
        obj = EmbeddingReqInput.from_openai_input(body["input"], body.get("dimensions"))
        results = await encode_request(state.tm, obj)
        return JSONResponse(openai_embedding_response(results, state.served_model_name, fmt))

    @app.post("/encode")
    async def encode(request: Request) -> JSONResponse:
        body = known_fields(await read_json(request), NATIVE_ENCODE_FIELDS)
        obj = EmbeddingReqInput(**body)
        results = await encode_request(state.tm, obj)
        return JSONResponse(results if obj.is_batch else results[0])


def known_fields(body: dict, fields: tuple) -> Dict[str, Any]:
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise FieldError(unknown[0], f"unsupported field '{unknown[0]}' (supported: {', '.join(fields)})")
    return {k: v for k, v in body.items() if v is not None}


def openai_embedding_response(results: List[Dict[str, Any]], model: str, fmt: str) -> Dict[str, Any]:
    prompt_tokens = sum(r["meta_info"]["prompt_tokens"] for r in results)
    data = [{"object": "embedding", "index": i,
             "embedding": encode_base64(r["embedding"]) if fmt == "base64" else r["embedding"]}
            for i, r in enumerate(results)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
