"""Every error the online server can answer, in one JSON shape ``{"error": {"code", "message"}}``,
and the OpenAPI description of each status, so the contract names every status an endpoint returns."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from mms_core.errors import MMSError
from mms_core.serving.payload import PayloadError

log = logging.getLogger("mms.serving")


class ApiError(MMSError):
    """An answer other than 200: its HTTP status, a stable code and a message naming the fix."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.retry_after_s = status, code, retry_after_s
        self.headers = headers or {}


class Overloaded(ApiError):
    """No replica can take the request now (full queues, none healthy, shutting down): 503."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(503, "overloaded", message, retry_after_s=retry_after_s)


class DeadlineExceeded(ApiError):
    """The request was not answered within ``request_timeout_s``: 504, its slot is freed."""

    def __init__(self, message: str) -> None:
        super().__init__(504, "deadline_exceeded", message, retry_after_s=1.0)


class UnknownVersion(ApiError):
    """The version named is not served (or not in the registry): 404."""

    def __init__(self, message: str) -> None:
        super().__init__(404, "unknown_version", message)


class Conflict(ApiError):
    """The request cannot apply to what is served now (the only version, a duplicate, no registry): 409."""

    def __init__(self, message: str) -> None:
        super().__init__(409, "conflict", message)


class ReplicaError(ApiError):
    """The model itself raised on this request (alone: a batch that fails is retried row by row)."""

    def __init__(self, message: str, *, version: str) -> None:
        super().__init__(500, "model_error", message)
        self.version = version


def error_response(exc: Exception) -> Response:
    """``exc`` as the JSON error answer with its status (and Retry-After where the client may retry)."""
    headers: dict[str, str] = {}
    if isinstance(exc, ApiError):
        status, code, retry_after, headers = exc.status, exc.code, exc.retry_after_s, dict(exc.headers)
    elif isinstance(exc, PayloadError):
        status, code, retry_after = exc.status, exc.code, None
    elif isinstance(exc, MMSError):
        status, code, retry_after = 400, "bad_request", None
    else:
        status, code, retry_after = 500, "internal_error", None
        log.error("unexpected error (a server bug: please report it)", exc_info=exc)
        exc = RuntimeError("internal error; the server log has the details")
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    body = orjson.dumps({"error": {"code": code, "message": str(exc)}})
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def install_handlers(app: FastAPI) -> None:
    """Route Starlette's and FastAPI's own errors (404, 405, validation) through :func:`error_response`."""

    @app.exception_handler(MMSError)
    async def mms_error(request: Request, exc: MMSError) -> Response:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        headers = dict(exc.headers or {})  # 405 carries Allow (RFC 9110)
        return error_response(ApiError(exc.status_code, "http_error", str(exc.detail), headers=headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(ApiError(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}"))


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
_MEANING = {
    400: "The body is not JSON (syntax, bad UTF-8, nesting or a number beyond the parser's limits).",
    401: "No API key where one is required, or an unknown one.",
    403: "The key is revoked, or is not an admin key for /admin.",
    404: "Unknown model or version.",
    409: "Cannot apply to what is served: the only version, already served, fails to load, no registry,"
    " all-zero shares.",
    413: "The body or the row count is over the limit: split the batch.",
    415: "The body is not application/json.",
    422: "The payload does not match the model's signature (2-D, row width, numbers, finite).",
    429: "The key is over its row quota (Retry-After says when to retry).",
    500: "The model raised on this request.",
    503: "Overloaded, no healthy replica, or shutting down (Retry-After says when to retry).",
    504: "Not answered within the request deadline.",
}


def responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI ``responses`` entries for the error statuses a route returns."""
    return {
        s: {"description": _MEANING[s], "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
        for s in statuses
    }
