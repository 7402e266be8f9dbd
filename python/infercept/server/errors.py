"""The server's error answers: 400s that name the value and the limit, and the 503 of a
stopped engine."""

from __future__ import annotations

import json

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from infercept.server import protocol as p


class BadRequestError(Exception):
    """A request the server refuses with 400 (the message names the value and the limit)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def engine_unavailable(message: str) -> JSONResponse:
    """503: the engine stopped (its process died); ``/health`` says so too."""
    return JSONResponse(p.error_body(message, code="engine_unavailable",
                                     error_type="service_unavailable"), status_code=503)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A pydantic validation failure as OpenAI's 400 message, and the first bad param."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", detail.get("msg", ""))
        return f"malformed JSON body: {reason}", None
    parts, first_param = [], None
    for error in errors:
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        first_param = first_param or param
        value = error.get("input")
        shown = f" (got {json.dumps(value)[:200]})" if value is not None and not isinstance(
            value, dict) else ""
        parts.append(f"{param or 'body'}: {error.get('msg', 'invalid')}{shown}")
    return "invalid request: " + "; ".join(parts), first_param
