"""Prediction routes: ``POST /v1/models/{name}/predict``, MLflow's ``POST /invocations`` and the
running input statistics ``GET /v1/models/{name}/stats``.

A request passes, in this order: the API key (a dependency), the server-wide request cap, the model
name, the key's quota (before the body is read: a key over quota costs no parsing), the body
(content type, size, JSON), the payload check against the model's signature, then the router.
Every failure on the way is this request's alone and leaves as a JSON error.
"""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel

from mms_core.monitoring.stats import StatsSnapshot
from mms_core.serving.metering import ApiKey
from mms_core.serving.online.auth import Auth, bearer
from mms_core.serving.online.body import read_json
from mms_core.serving.online.errors import ApiError, error_response, responses
from mms_core.serving.online.runtime import ServingRuntime
from mms_core.serving.payload import parse_body

PREDICT_ERRORS = (400, 401, 403, 404, 413, 415, 422, 429, 500, 503, 504)


class Predictions(BaseModel):
    predictions: list[int | str]
    model: str
    version: str


def predict_routes(runtime: ServingRuntime, auth: Auth) -> APIRouter:
    router = APIRouter(tags=["predict"])
    served = runtime.model.name
    body_doc = {
        "requestBody": {"required": True, "content": {"application/json": {"schema": _body_schema(runtime)}}},
        "security": [{bearer.scheme_name: []}, {}],  # a key, or none where keys are optional
    }
    documented = {200: {"model": Predictions}, **responses(*PREDICT_ERRORS)}

    async def handle(request: Request, endpoint: str, name: str) -> Response:
        t0 = time.perf_counter()
        version = None
        try:
            key = await auth.key_of(request)  # not a dependency: see mms_core.serving.online.auth
            with runtime.admitted():
                if name != served:
                    raise ApiError(
                        404, "unknown_model", f"model {name!r} is not served here; served: {served!r}"
                    )
                x = await _rows(runtime, request, key)
                reply = await runtime.router.predict(x)
            version = reply.version
            _account(runtime, key, x, reply)
            body = {"predictions": reply.labels.tolist(), "model": served, "version": reply.version}
            response = Response(orjson.dumps(body), media_type="application/json")
        except Exception as exc:
            response = error_response(exc)
            version = getattr(exc, "version", None)
            runtime.metrics.errors.labels(code=str(response.status_code)).inc()
        elapsed = time.perf_counter() - t0
        runtime.metrics.requests.labels(endpoint=endpoint, code=str(response.status_code)).inc()
        runtime.metrics.latency.labels(endpoint=endpoint).observe(elapsed)
        if version is not None:
            runtime.router.pools.record(version, elapsed * 1e3, ok=response.status_code < 500)
        return response

    @router.post(
        "/v1/models/{name}/predict", summary="Predict rows with the served model",
        response_model=None, responses=documented, openapi_extra=body_doc,
    )  # fmt: skip
    async def predict(name: str, request: Request) -> Response:
        return await handle(request, "predict", name)

    @router.post(
        "/invocations", summary="MLflow scoring protocol (inputs, instances, dataframe_split/records)",
        response_model=None, responses=documented, openapi_extra=body_doc,
    )  # fmt: skip
    async def invocations(request: Request) -> Response:
        return await handle(request, "invocations", served)

    @router.get(
        "/v1/models/{name}/stats", summary="Running input statistics and predicted-class counts",
        response_model=StatsSnapshot, responses=responses(401, 403, 404, 422),
    )  # fmt: skip
    async def stats(
        name: str, version: str | None = None, key: ApiKey | None = Depends(auth.caller)
    ) -> Response:
        if name != served:
            raise ApiError(404, "unknown_model", f"model {name!r} is not served here; served: {served!r}")
        version = version or runtime.model.version
        if version not in runtime.monitors:
            raise ApiError(
                404, "unknown_version",
                f"no statistics of version {version}: this server has served {sorted(runtime.monitors)}",
            )  # fmt: skip
        snapshot = runtime.monitors[version].snapshot()
        if key is None or not key.admin:  # raw input rows are every tenant's data: admins only
            snapshot = snapshot.model_copy(update={"sample": []})
        return Response(snapshot.model_dump_json(), media_type="application/json")

    return router


async def _rows(runtime: ServingRuntime, request: Request, key: ApiKey | None):
    if key is not None and key.quota_rows_per_min:
        wait = runtime.quota.wait_s(key_id=key.key_id, limit_per_min=key.quota_rows_per_min)
        if wait > 0:
            raise _over_quota(key, wait)
    x = parse_body(await read_json(request, limit=runtime.config.max_body_bytes), runtime.schema)
    if key is not None and key.quota_rows_per_min:
        wait = runtime.quota.try_acquire(key_id=key.key_id, rows=len(x), limit_per_min=key.quota_rows_per_min)
        if wait > 0:
            raise _over_quota(key, wait)
    return x


def _over_quota(key: ApiKey, wait: float) -> ApiError:
    return ApiError(
        429, "over_quota", f"key {key.key_id} is over its quota of {key.quota_rows_per_min} rows/min",
        retry_after_s=wait,
    )  # fmt: skip


def _account(runtime: ServingRuntime, key: ApiKey | None, x, reply) -> None:
    if runtime.meter is not None:
        runtime.meter.record(
            key_id=key.key_id if key else None, model=runtime.model.name, version=reply.version,
            rows=len(x), compute_ms=reply.compute_ms,
        )  # fmt: skip
    runtime.metrics.rows.labels(version=reply.version).inc(len(x))
    monitor = runtime.monitors.get(reply.version)
    if monitor is not None:
        monitor.update(x, reply.labels)


def _body_schema(runtime: ServingRuntime) -> dict:
    """JSON Schema of the request formats whose every instance the server accepts (it also takes
    ``inputs`` as {column: [values]}, which a schema cannot tie to equal lengths)."""
    features = runtime.model.package.features
    width = len(features)
    # A body must fit max_body_bytes: at most ~24 characters per number as JSON.
    max_rows = max(1, min(runtime.schema.max_rows, runtime.config.max_body_bytes // (width * 26 + 4)))
    number = {"type": "number", "minimum": -3.0e38, "maximum": 3.0e38}  # finite in float32
    rows = {
        "type": "array", "minItems": 1, "maxItems": max_rows,
        "items": {"type": "array", "items": number, "minItems": width, "maxItems": width},
    }  # fmt: skip
    record = {"type": "object", "properties": dict.fromkeys(features, number), "required": features}
    split = {
        "type": "object", "required": ["columns", "data"], "additionalProperties": False,
        "properties": {"columns": {"const": features}, "data": rows},
    }  # fmt: skip
    records = {"type": "array", "items": record, "minItems": 1, "maxItems": max_rows}

    def one(key: str, schema: dict) -> dict:
        return {
            "type": "object",
            "required": [key],
            "properties": {key: schema},
            "additionalProperties": False,
        }

    return {
        "oneOf": [
            one("inputs", rows), one("instances", rows), one("dataframe_split", split),
            one("dataframe_records", records),
        ]
    }  # fmt: skip
