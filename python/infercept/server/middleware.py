"""ASGI middleware of the server: response counting and bearer-token authentication."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi.responses import JSONResponse

from infercept.server import protocol as p
from infercept.server.metrics import ServerMetrics


class StatusCounter:
    """ASGI middleware counting responses by endpoint and status (streaming-safe)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class BearerAuth:
    """ASGI middleware: every ``/v1`` route needs ``Authorization: Bearer <api_key>``.

    The key is compared in constant time; a missing or wrong one gets OpenAI's 401 body.
    """

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self._api_key = api_key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/v1" or path.startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._api_key):
            await self.app(scope, receive, send)
            return
        message = ("Missing API key: send it as 'Authorization: Bearer <key>'" if not header
                   else "Incorrect API key provided")
        response = JSONResponse(p.error_body(message, code="invalid_api_key"), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
