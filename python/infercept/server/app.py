"""FastAPI routes of the OpenAI-compatible server.

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` (``completions.py``),
``POST /v1/chat/completions`` (``chat.py``; both streaming over SSE or not, ``streaming.py``),
``/v1/responses`` (``responses.py``), ``GET /health`` and ``GET /metrics`` (Prometheus text).
With an API key configured, every ``/v1`` route needs ``Authorization: Bearer <key>``
(``middleware.py``); ``/health`` and ``/metrics`` stay open (probes and scrapers).

A chat completion that ends on a call to one of the request's ``tools`` returns
``finish_reason="tool_calls"`` and leaves its engine request paused in the
:class:`~infercept.server.sessions.PausedContextStore`; the follow-up carrying the tool result
resumes it when its tokens continue the paused context exactly (see ``sessions.py``). The
server's state is :class:`~infercept.server.openai_server.OpenAIServer`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from infercept.engine import LLMEngine
from infercept.server import protocol as p
from infercept.server.engine_loop import EngineDeadError
from infercept.server.engine_process import EngineSpec
from infercept.server.errors import BadRequestError, engine_unavailable, validation_message
from infercept.server.metrics import CONTENT_TYPE
from infercept.server.middleware import BearerAuth, StatusCounter
from infercept.server.openai_server import OpenAIServer, ServerConfig
from infercept.server.responses import add_routes as add_responses_routes

__all__ = ["BadRequestError", "OpenAIServer", "ServerConfig", "create_app"]


def create_app(engine: LLMEngine | EngineSpec, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (see :class:`OpenAIServer`); the engine process
    (or thread) runs for the app's lifespan."""
    server = OpenAIServer(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="InferCept", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return JSONResponse(p.error_body(message, param), status_code=400)

    @app.exception_handler(BadRequestError)
    async def _bad(request: Request, exc: BadRequestError) -> JSONResponse:
        return JSONResponse(p.error_body(str(exc), exc.param, exc.code), status_code=400)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return engine_unavailable(str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(p.error_body(str(exc.detail), error_type="not_found_error"
                                         if exc.status_code == 404 else "invalid_request_error"),
                            status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = server.engine_loop.is_alive
        if alive:
            return JSONResponse({"status": "ok"})
        reason = getattr(server.engine_loop, "dead_reason", None) or "the engine stopped"
        return JSONResponse({"status": "engine stopped", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await server.metrics_text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": server.config.served_model_name, "object": "model", "created": 0,
            "owned_by": "infercept", "root": server.engine.model_name,
            "max_model_len": server.engine.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: p.ChatCompletionRequest, request: Request) -> Any:
        return await server.chat(req, request)

    @app.post("/v1/completions")
    async def completions(req: p.CompletionRequest, request: Request) -> Any:
        return await server.complete(req, request)

    app.state.responses = add_responses_routes(app, server)

    if server.config.api_key:
        app.add_middleware(BearerAuth, api_key=server.config.api_key)
    app.add_middleware(StatusCounter, metrics=server.metrics)  # outermost: counts the 401s too
    return app
