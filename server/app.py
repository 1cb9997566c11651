"""The HTTP routes: OpenAI's completions, chat, models, plus health, metrics, tokenize and version.

Each route is thin: check the model name, turn the body into a `Job` (completions.py), start it on the
`AsyncEngine`, and return its JSON or its event stream. Every error leaves as OpenAI's error body
(errors.py), FastAPI's own validation errors included (400, not 422), and the OpenAPI schema FastAPI
publishes lists exactly those answers, so clients and fuzzers can trust it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

import miniengine
from miniengine import AsyncEngine, EngineStoppedError
from miniengine.server.completions import Job, chat_job, chat_prompt_ids, completion_job
from miniengine.server.config import ServerConfig
from miniengine.server.errors import APIError
from miniengine.server.metrics import PrometheusStatLogger
from miniengine.server.middleware import Gate
from miniengine.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeChat,
    TokenizePrompt,
    TokenizeResponse,
    VersionResponse,
)

logger = logging.getLogger("miniengine.server")


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorResponse, "description": "an OpenAI-style error"} for code in codes}


# Before OpenAPI 3.2, the schema of an event stream describes one event.
_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string", "description": "one chunk as JSON, or [DONE] after the last"}},
    "required": ["data"],
}
_SSE = {
    200: {
        "content": {"text/event-stream": {"schema": _EVENT}},
        "description": "the completion; with stream: true, server-sent events ending in `data: [DONE]`",
    }
}
_POST_ERRORS = _errors(400, 401, 404, 413)


def served_model_name(model_path: str) -> str:
    """What /v1/models lists by default: the checkpoint's file name without .gguf, or its directory's name."""
    path = Path(model_path)
    return path.stem if path.suffix == ".gguf" else path.name


def build_app(async_engine: AsyncEngine, config: ServerConfig, metrics: PrometheusStatLogger, model: str) -> FastAPI:
    """The server as an ASGI app over a running `AsyncEngine`; `metrics` is one of its engine's stat loggers."""
    engine = async_engine.engine
    app = FastAPI(title="miniengine", version=miniengine.__version__, summary="An OpenAI-compatible server.")
    app.add_middleware(Gate, config=config)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}").response()
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = where[0] if where else None
        message = f"{param or 'body'}: {first.get('msg', 'invalid')}"
        if sum(1 for e in error.errors() if e.get("loc", ())[1:2] == (param,)) > 1:
            message += " (it may take one of several forms: none matched)"
        return APIError(400, message, param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        body = {"error": {"message": str(error.detail), "type": "invalid_request_error", "param": None, "code": None}}
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error ({type(error).__name__}); the server log has the details").response()

    def check_model(name: str | None) -> None:
        if name is not None and name != model:
            raise APIError(
                404, f"the model {name!r} does not exist; this server serves {model!r}", "model", "model_not_found"
            )

    async def run(job: Job, stream: bool, request: Request) -> Response:
        request.state.job = job  # for the request's log line
        await job.start(async_engine, config)
        if stream:
            return StreamingResponse(
                job.events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            body = await _unless_disconnected(job.response(), request)
        except EngineStoppedError as error:
            raise APIError(503, str(error)) from None
        finally:
            job.close()
        return JSONResponse(body.model_dump(mode="json")) if body is not None else Response(status_code=499)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={**_POST_ERRORS, **_errors(503), **_SSE},
        summary="Complete one or more prompts (text or token ids)",
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        return await run(completion_job(body, engine, config, model), body.stream, request)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={**_POST_ERRORS, **_errors(503), **_SSE},
        summary="Answer a conversation through the model's chat template",
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        return await run(chat_job(body, engine, config, model), body.stream, request)

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401))
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model, created=0, max_model_len=engine.max_model_len)])

    @app.get("/health", response_model=HealthResponse, responses=_errors(503))
    async def health() -> HealthResponse:
        if not async_engine.healthy:
            reason = async_engine.error or "it was shut down"
            raise APIError(503, f"the engine loop is not running: {reason}")
        return HealthResponse()

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"}},
    )
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_POST_ERRORS)
    async def tokenize(body: TokenizePrompt | TokenizeChat) -> TokenizeResponse:
        check_model(body.model)
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        if isinstance(body, TokenizePrompt):
            ids = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            ids = chat_prompt_ids(body.messages, engine)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_model_len)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_POST_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(body.model)
        vocab = engine.hf_config.vocab_size
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        if any(t >= vocab for t in body.tokens):
            raise APIError(400, f"token id {max(body.tokens)} is outside the vocabulary [0, {vocab})", "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=miniengine.__version__)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


async def _unless_disconnected(work, request: Request):  # noqa: ANN001, ANN202
    """Await `work`, unless the client disconnects first: then cancel it (its requests abort) and return None."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task in done else None
    finally:
        task.cancel()
        watcher.cancel()


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, less its 422 answers: validation errors leave as 400 with OpenAI's error body."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
