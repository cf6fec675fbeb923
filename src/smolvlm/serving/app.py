"""The FastAPI app: OpenAI's chat-completions routes over one ``Engine`` (``create_app``).

Routes: ``GET /health`` (200 while the engine loop runs, else 503; never needs the key),
``GET /v1/models`` and ``GET /v1/models/{id}``, ``GET /metrics`` (Prometheus text),
``POST /v1/chat/completions`` (JSON, or SSE with ``"stream": true``), and ``GET /`` (the web chat
page ``static/index.html``; it holds no data, so it loads without the key and sends the key the
user types with its API calls). No OpenAPI/docs routes: every route that does anything needs the key.

With an API key, every route but ``/health`` and ``/`` needs ``Authorization: Bearer KEY``
(compared in constant time; 401 otherwise). Every error is OpenAI's ``{"error": {...}}`` body
(``errors.py``); bad input is a 4xx, never a 500, and leaves the server healthy.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from smolvlm.generation.engine import Engine
from smolvlm.generation.pixels import pixel_dtype
from smolvlm.serving import completions, schemas
from smolvlm.serving.errors import APIError, http_error
from smolvlm.serving.media import MB, MediaLimits
from smolvlm.serving.metrics import ServerMetrics
from smolvlm.serving.parse import parse_chat_request

log = logging.getLogger("smolvlm.serving")

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
PLACEHOLDER = ("<!doctype html><meta charset=utf-8><title>smolvlm</title><h1>smolvlm serve</h1>"
               "<p>An OpenAI-compatible server: <code>POST /v1/chat/completions</code>, <code>GET /v1/models</code>, "
               "<code>GET /health</code>, <code>GET /metrics</code>.</p>")
DRAIN_FACTOR = 4  # an over-limit body is read (and dropped) up to 4x the limit, so the client sees the 413


@dataclass(frozen=True)
class ServerConfig:
    model_id: str = "default"
    api_key: str | None = None
    max_batch: int = 4
    max_context: int | None = None  # None: the engine's default (min(2048, max_position_embeddings))
    max_queue: int = 64
    max_body_bytes: int = 32 * MB
    media: MediaLimits = MediaLimits()


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _MetricsMiddleware:
    """Counts every response by route and status (pure ASGI: streams pass through untouched)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.response(scope.get("path", ""), int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


class _SSEResponse(StreamingResponse):
    """Closes its event generator however the response ends, so a vanished client's request is cancelled."""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 over ``limit`` bytes (declared or actual), 400 if it is not JSON."""
    declared = request.headers.get("content-length", "")
    too_large = http_error(413, f"the request body is over this server's limit of {limit} bytes "
                                f"(--max-body-mb); send smaller or fewer images")
    if declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
        raise too_large
    buf, total = bytearray(), 0
    try:
        async for piece in request.stream():
            total += len(piece)
            if total <= limit:
                buf += piece
            elif total > DRAIN_FACTOR * limit:
                raise too_large
    except ClientDisconnect:  # nobody will read the answer
        raise APIError(400, "the client disconnected while sending the request", code="client_disconnected") from None
    if total > limit or (declared.isdigit() and int(declared) > limit):
        raise too_large
    try:
        return json.loads(buf)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None


def create_app(model: Any, processor: Any, config: ServerConfig | None = None, engine: Engine | None = None) -> FastAPI:
    """The app over ``model`` / ``processor``; the engine (created here unless given) runs while the app does."""
    config = config or ServerConfig()
    engine = engine or Engine(model, max_batch=config.max_batch, max_context=config.max_context,
                              max_queue=config.max_queue)
    metrics = ServerMetrics()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="smolvlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return _error_response(http_error(e.status_code, msg))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(APIError(400, "invalid request: " + "; ".join(str(x.get("msg")) for x in e.errors())))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error_response(APIError(500, "internal server error (see the server log)", type="server_error",
                                        code="internal_error"))

    def authorized(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorized)]

    @app.get("/health")
    async def health() -> Response:
        if not engine.running:
            return _error_response(APIError(503, "the engine loop is not running", type="server_error",
                                            code="unavailable"))
        return JSONResponse({"status": "ok", "model": config.model_id})

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(PAGE, media_type="text/html") if PAGE.is_file() else HTMLResponse(PLACEHOLDER)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return schemas.model_list(config.model_id, created, engine.max_context)

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model_card(model_id: str) -> dict[str, Any]:
        if model_id != config.model_id:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {config.model_id!r}",
                           param="model", code="model_not_found")
        return schemas.model_card(config.model_id, created, engine.max_context)

    @app.get("/metrics", dependencies=auth)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine.metrics()), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request, config.max_body_bytes)
        req = parse_chat_request(body, served_model=config.model_id, max_context=engine.max_context)
        inputs = await run_in_threadpool(completions.build_inputs, req, processor, config.media, engine.max_context,
                                         pixel_dtype(engine.model))
        handle = completions.submit(engine, processor.tokenizer, inputs, req)
        run = completions.Running.start(handle, config.model_id, req.include_usage, metrics)
        if req.stream:
            return _SSEResponse(completions.sse_events(run), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answer = await completions.json_answer(run, request.receive)
        return JSONResponse(answer) if answer is not None else Response(status_code=499)

    return app
