"""Read a prediction request's body: content type, size limit while streaming, JSON that cannot hurt
the parser. Every way a body can be unusable ends in a PayloadError with a 4xx status, never a 500.

Written by hand instead of a pydantic body model: the payload formats are a union FastAPI cannot
validate cheaply, and the size limit must hold while the body streams in, before it is parsed.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from fastapi import Request

from mms_core.serving.payload import PayloadError

JSON_TYPES = ("application/json", "")  # no header at all: a bare client; assume JSON


def check_content_type(request: Request) -> None:
    """415 unless the body is declared as JSON (or not declared)."""
    header = request.headers.get("content-type", "")
    media = header.split(";", 1)[0].strip().lower()
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise PayloadError(
            f"content type {media!r} is not supported: send the body as JSON with "
            "`Content-Type: application/json`",
            status=415,
            code="unsupported_media_type",
        )


async def read_json(request: Request, *, limit: int) -> Any:
    """The decoded JSON body of ``request``, at most ``limit`` bytes.

    Raises:
        PayloadError: 413 over the limit, 415 not JSON, 400 when it cannot be decoded.
    """
    check_content_type(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadError(
            f"body of {declared} bytes is over the {limit}-byte limit; split the batch",
            status=413,
            code="too_large",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadError(
                f"body is over the {limit}-byte limit; split the batch", status=413, code="too_large"
            )
        chunks.append(chunk)
    return decode(b"".join(chunks))


def decode(raw: bytes) -> Any:
    """JSON from ``raw``; orjson first (fast, depth-limited), Python's json for NaN/Infinity tokens
    (which Python clients write and the NaN policy then judges).

    Raises:
        PayloadError: 400 for bad syntax, bad UTF-8, nesting or numbers beyond the parsers' limits.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        first = str(exc)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and the int-digits limit
        raise PayloadError(
            f"body is not valid JSON: {first[:200]}", status=400, code="invalid_json"
        ) from None
