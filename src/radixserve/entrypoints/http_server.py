"""The HTTP server: OpenAI-compatible and SGLang-native endpoints (FastAPI).

It wraps the same TokenizerManager and subprocesses as the Engine. Bad input
is a 400 with an OpenAI-style error body; nothing else is disturbed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixserve.entrypoints import worker_info
from radixserve.entrypoints.http_guard import TransportGuard, error_response, until_disconnected
from radixserve.entrypoints.openai.embeddings import add_embedding_routes
from radixserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from radixserve.entrypoints.openai.serving import ModelNotFound, OpenAIServing, prepend, sse
from radixserve.managers import io_struct as io
from radixserve.managers.generate_input import GenerateReqInput, RequestRejected
from radixserve.managers.native_fields import implemented_fields
from radixserve.managers.tokenizer_manager import PreparedGenerate, TokenizerManager
from radixserve.managers.validation import FieldError, check_int, check_json_value
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)


@dataclass
class ServerState:
    tm: TokenizerManager
    server_args: ServerArgs
    served_model_name: str
    api_key: Optional[str] = None
    ready: bool = False
    loop: Optional[asyncio.AbstractEventLoop] = None

ADMIN_PATHS = {"/flush_cache", "/abort_request", "/update_weights_from_disk", "/get_weights_by_name",
               "/pause_generation", "/continue_generation", "/init_weights_update_group",
               "/update_weights_from_distributed", "/destroy_weights_update_group",
               "/release_memory_occupation", "/resume_memory_occupation", "/load_lora_adapter",
               "/unload_lora_adapter"}


# /get_weights_by_name returns at most this many values of a weight (a whole
# weight can be hundreds of MB of JSON).
MAX_WEIGHTS_TRUNCATE_SIZE = 10_000
# Bodies larger than this are parsed in a thread instead of on the event loop.
_PARSE_OFF_LOOP_BYTES = 1 << 20


async def json_object(request: Request) -> dict:
    """The body as a JSON object, refused (400) unless it is standard JSON
    (no NaN / Infinity), valid Unicode throughout and nested at most
    MAX_JSON_DEPTH deep."""
    raw = await request.body()
    if len(raw) > _PARSE_OFF_LOOP_BYTES:
        data = await asyncio.get_running_loop().run_in_executor(None, parse_json, raw)
    else:
        data = parse_json(raw)
    if not isinstance(data, dict):
        raise ValueError("the request body must be a JSON object")
    return data


def parse_json(raw: bytes) -> Any:
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed JSON body: {e}") from None
    except RecursionError:  # the parser's own limit, near 1000 levels
        raise ValueError("the JSON body nests too deeply") from None
    check_json_value(data)
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"malformed JSON body: {name} is not standard JSON")


def required(body: dict, name: str, kind: type) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FieldError(name, f"'{name}' must be a {kind.__name__}")
    return value


def optional(body: dict, name: str, kind: type, default: Any) -> Any:
    return default if body.get(name) is None else required(body, name, kind)


def success_response(out: Any, **extra: Any) -> JSONResponse:
    """{"success", "message", ...}: 200 on success, else 400."""
    return JSONResponse({"success": out.success, "message": out.message, **extra},
                        status_code=200 if out.success else 400)


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    data = await json_object(request)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = _field_path(first["loc"])
        raise FieldError(field, f"invalid field '{field}': {first['msg']}"[:500]) from None


def _field_path(loc: tuple) -> str:
    """pydantic's error location as the client wrote it: ('messages', 0,
    'content', 'str') -> 'messages[0].content' (union member names dropped)."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif "[" in part or "-" in part or part in ("str", "int", "float", "bool", "dict", "list"):
            break  # a union member's name, not a field
        else:
            name += f".{part}" if name else part
    return name or "body"


def create_app(state: ServerState, warmup: Optional[Callable[[], Awaitable[None]]] = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        if warmup is not None:
            await warmup()
        state.ready = True
        yield
        state.ready = False

    app = FastAPI(lifespan=lifespan)
    serving = OpenAIServing(state.tm, state.served_model_name)

    def failed(status: int, message: str, **kwargs: Any) -> JSONResponse:
        if state.tm.metrics:
            state.tm.metrics.on_error(status)
        return error_response(status, message, **kwargs)

    app.add_middleware(TransportGuard, api_key=state.api_key, admin_api_key=state.server_args.admin_api_key,
                       admin_paths=ADMIN_PATHS, max_body_bytes=state.server_args.max_request_body_bytes,
                       metrics=state.tm.metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 404 (no such route) and 405 (wrong method), in our format.
        response = failed(e.status_code, f"{e.detail}: {request.method} {request.url.path}")
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(ValueError)
    async def bad_input(request: Request, e: ValueError) -> JSONResponse:
        return failed(400, str(e), param=getattr(e, "field", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        """Last resort: a bug in a route is a JSON 500 in our error format,
        logged with its traceback; the server keeps serving."""
        if state.tm.is_dead:  # a child process died: say so rather than "internal error"
            return failed(503, state.tm.dead_reason, err_type="server_error")
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        return failed(500, f"internal error: {type(e).__name__}", err_type="server_error")

    @app.exception_handler(ModelNotFound)
    async def no_model(request: Request, e: ModelNotFound) -> JSONResponse:
        return failed(404, str(e), code="model_not_found", param="model")

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, e: RequestRejected) -> JSONResponse:
        response = failed(e.status_code, str(e), err_type="server_error")
        if e.status_code == 503:
            response.headers["Retry-After"] = "1"
        return response

    @app.get("/metrics")
    async def metrics() -> Response:
        if not state.tm.metrics:
            return error_response(404, "metrics are disabled: start the server with --enable-metrics",
                                  err_type="not_found_error")
        return Response(state.tm.metrics.render(), media_type="text/plain; version=0.0.4")

    # ---- health and info ----
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.ready and not state.tm.is_dead else 503)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        gen = GenerateReqInput(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0})
        async for _ in state.tm.generate_request(gen):
            pass
        return Response(status_code=200)

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def model_info() -> dict:
        return await asyncio.get_running_loop().run_in_executor(  # the first call reads the config
            None, worker_info.model_info, state.server_args, state.served_model_name, state.tm.context_len)

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def server_info() -> dict:
        info = await state.tm.get_server_info()
        return await asyncio.get_running_loop().run_in_executor(
            None, worker_info.server_info, state.server_args, state.served_model_name, info)

    @app.get("/get_load")
    async def get_load() -> list:
        return worker_info.load_records(await state.tm.get_server_info())

    @app.get("/flush_cache")
    @app.post("/flush_cache")
    async def flush_cache(request: Request) -> JSONResponse:
        # ?flush_storage=true also empties the hierarchical cache's storage tier
        flush_storage = request.query_params.get("flush_storage", "").lower() in ("1", "true")
        out = await state.tm.flush_cache(flush_storage)
        if not out.success:  # SGLang answers 400 too
            return failed(400, f"Cache not flushed: {out.message}")
        return JSONResponse({"success": True, "message": "Cache flushed."})

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> JSONResponse:
        body = await json_object(request)
        path, version = body.get("model_path"), body.get("weight_version")
        if not isinstance(path, str) or not isinstance(version, (str, type(None))):
            raise ValueError("'model_path' must be a string and 'weight_version' a string or null")
        out = await state.tm.update_weights(io.UpdateWeightsFromDiskReq(
            path, body.get("load_format"), version, body.get("abort_all_requests", False) is True))
        return JSONResponse({"success": out.success, "message": out.message or "Weights updated.",
                             "weight_version": out.weight_version}, status_code=200 if out.success else 400)

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request) -> JSONResponse:
        body = await json_object(request)
        req = io.InitWeightsUpdateGroupReq(
            master_address=required(body, "master_address", str), master_port=required(body, "master_port", int),
            rank_offset=required(body, "rank_offset", int), world_size=required(body, "world_size", int),
            group_name=optional(body, "group_name", str, "weight_update_group"),
            backend=optional(body, "backend", str, None))
        return success_response(await state.tm.control(req))

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request) -> JSONResponse:
        body = await json_object(request)
        req = io.UpdateWeightsFromDistributedReq(
            names=required(body, "names", list), dtypes=required(body, "dtypes", list),
            shapes=required(body, "shapes", list),
            group_name=optional(body, "group_name", str, "weight_update_group"),
            flush_cache=optional(body, "flush_cache", bool, True),
            weight_version=optional(body, "weight_version", str, None),
            abort_all_requests=optional(body, "abort_all_requests", bool, False))
        out = await state.tm.update_weights(req)
        return JSONResponse({"success": out.success, "message": out.message or "Weights updated.",
                             "weight_version": out.weight_version}, status_code=200 if out.success else 400)

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request) -> JSONResponse:
        body = await json_object(request)
        req = io.DestroyWeightsUpdateGroupReq(optional(body, "group_name", str, "weight_update_group"))
        return success_response(await state.tm.control(req))

    @app.post("/release_memory_occupation")
    async def release_memory_occupation() -> JSONResponse:
        out = await state.tm.control(io.ReleaseMemoryOccupationReq())
        return success_response(out, released_bytes=out.num_bytes)

    @app.post("/resume_memory_occupation")
    async def resume_memory_occupation() -> JSONResponse:
        out = await state.tm.control(io.ResumeMemoryOccupationReq())
        return success_response(out, resumed_bytes=out.num_bytes)

    @app.post("/pause_generation")
    async def pause_generation(request: Request) -> dict:
        body = await json_object(request)
        out = await state.tm.pause_generation(body.get("mode", "in_place"))
        if not out.success:
            raise ValueError(out.message)
        return {"success": True}

    @app.post("/continue_generation")
    async def continue_generation() -> dict:
        await state.tm.continue_generation()
        return {"success": True}

    @app.get("/get_weights_by_name")
    @app.post("/get_weights_by_name")
    async def get_weights_by_name(request: Request) -> list:
        body = await json_object(request) if request.method == "POST" else dict(request.query_params)
        name = body.get("name")
        if not isinstance(name, str):
            raise FieldError("name", "'name' must be a string")
        size = body.get("truncate_size", 100)
        if isinstance(size, str) and size.isdigit() and len(size) <= 20:  # a query parameter
            size = int(size)
        check_int("truncate_size", size, minimum=0, maximum=MAX_WEIGHTS_TRUNCATE_SIZE)
        return await state.tm.get_weights_by_name(name, size)

    # ---- LoRA adapters ----
    @app.post("/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> JSONResponse:
        body = await json_object(request)
        out = await state.tm.load_lora_adapter(required(body, "lora_name", str), required(body, "lora_path", str),
                                               optional(body, "pinned", bool, False))
        return lora_reply(out, "lora_path")

    @app.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> JSONResponse:
        """Waits until the adapter's running requests have finished (new ones are refused)."""
        body = await json_object(request)
        return lora_reply(await state.tm.unload_lora_adapter(required(body, "lora_name", str)), "lora_name")

    def lora_reply(out: io.LoRAAdapterOut, param: str) -> JSONResponse:
        if not out.success:
            return failed(400, out.message, param=param)
        loaded = {ref.name: ref.path for ref in state.tm.lora.adapters()}
        return JSONResponse({"success": True, "error_message": "", "loaded_adapters": loaded})

    @app.post("/abort_request")
    async def abort_request(request: Request) -> dict:
        body = await json_object(request)
        rid, abort_all = body.get("rid"), body.get("abort_all", False)
        if not isinstance(rid, (str, type(None))) or not isinstance(abort_all, bool):
            raise ValueError("'rid' must be a string and 'abort_all' a boolean")
        state.tm.abort_request(rid, abort_all)
        return {"success": True}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await json_object(request)
        field = "prompt" if "prompt" in body else "text"
        text = body.get(field)
        if not isinstance(text, str):
            raise FieldError(field, f"'{field}' must be a string")
        add_special = body.get("add_special_tokens", True)
        if not isinstance(add_special, bool):
            raise FieldError("add_special_tokens", "'add_special_tokens' must be a boolean")
        ids = await state.tm.encode(text, add_special_tokens=add_special)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.tm.context_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await json_object(request)
        ids = body.get("tokens")
        vocab = state.tm.vocab_size
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab for t in ids):
            raise FieldError("tokens", f"'tokens' must be a list of token ids in [0, {vocab})")
        return {"text": await state.tm.run_in_tokenizer(state.tm.tokenizer.decode, ids)}

    # ---- native generate ----
    @app.post("/generate")
    async def generate(request: Request) -> Response:
        body = implemented_fields(await json_object(request), state.server_args.dp_size)  # SGLang's fields
        args = {k: v for k, v in body.items() if k != "text"}
        gen = GenerateReqInput(prompt=body.get("text"), **args)
        prepared = await prepare_native(gen)
        if gen.stream:
            async def events() -> AsyncIterator[str]:
                async for chunk in state.tm.generate_request(gen, prepared):
                    yield sse(chunk)
                yield "data: [DONE]\n\n"
            return await streaming_response(request, events())

        async def collect():
            return [r async for r in state.tm.generate_request(gen, prepared)]
        results = await until_disconnected(request, collect())
        return JSONResponse(results if gen.is_batch or len(results) > 1 else results[0])

    async def prepare_native(gen: GenerateReqInput) -> PreparedGenerate:
        """Check and tokenize once; the prompt's field is `text` in /generate."""
        try:
            return await state.tm.prepare(gen)
        except FieldError as e:
            raise (e.renamed("text") if e.field == "prompt" else e) from None

    # ---- OpenAI ----
    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(state)] + adapter_cards(state)}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Response:
        cards = {card["id"]: card for card in [model_card(state)] + adapter_cards(state)}
        if model_id not in cards:
            return error_response(404, f"The model '{model_id}' does not exist", code="model_not_found",
                                  param="model")
        return JSONResponse(cards[model_id])

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await parse_body(request, CompletionRequest)
        prepared = await serving.prepare(req, serving.completion_input(req))
        if req.stream:
            return await streaming_response(request, serving.completions_stream(req, prepared))
        return JSONResponse(await until_disconnected(request, serving.completions(req, prepared)))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = await parse_body(request, ChatCompletionRequest)
        plan = await serving.chat_input(req)  # checked and tokenized before a stream starts
        if req.stream:
            return await streaming_response(request, serving.chat_stream(req, plan))
        return JSONResponse(await until_disconnected(request, serving.chat(req, plan)))

    add_embedding_routes(app, state, serving, json_object)  # /v1/embeddings, /encode
    return app


async def streaming_response(request: Request, events: AsyncIterator[str]) -> StreamingResponse:
    """Wait for the first event before answering 200, so that bad input or an
    overloaded server still gets a proper error status instead of a broken stream.
    A client that leaves before that first event (a long queue) aborts it too."""
    first = await until_disconnected(request, events.__anext__())
    return StreamingResponse(prepend(first, events), media_type="text/event-stream")


def adapter_cards(state: ServerState) -> list:
    """One card per loaded LoRA adapter (its id is the `model` that selects it)."""
    registry = state.tm.lora
    return [{"id": ref.name, "object": "model", "created": 0, "owned_by": "radixserve", "root": ref.path,
             "parent": state.served_model_name, "max_model_len": state.tm.context_len}
            for ref in (registry.adapters() if registry else [])]


def model_card(state: ServerState) -> dict:
    return {"id": state.served_model_name, "object": "model", "created": 0, "owned_by": "radixserve",
            "root": state.server_args.model_path, "max_model_len": state.tm.context_len}
