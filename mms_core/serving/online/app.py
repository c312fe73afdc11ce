"""The online server's HTTP surface (FastAPI): prediction endpoints, MLflow's /invocations
scoring protocol, health/readiness, Prometheus metrics and the admin API used by rollouts.

Prediction handlers read the raw body themselves (size limit while streaming, orjson, one
shared parser) instead of declaring a pydantic body: the payload formats are a union FastAPI
cannot validate cheaply, and every error must come back in the same JSON shape.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import orjson
from distributed import Client
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from mms_core.errors import MMSError
from mms_core.monitoring.stats import RunningStats
from mms_core.packaging import PackageConfig
from mms_core.serving.metering import ApiKey, KeyStore, QuotaLimiter, UsageMeter
from mms_core.serving.online.config import ServeConfig
from mms_core.serving.online.metrics import ServingMetrics
from mms_core.serving.online.router import Overloaded, ReplicaError, Router
from mms_core.serving.payload import InputSchema, PayloadError, parse_body

log = logging.getLogger("mms.serving")
Loader = Callable[[str], tuple[PackageConfig, bytes, str]]  # version -> (package, weights, version)


class ApiError(MMSError):
    def __init__(self, status: int, code: str, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.retry_after_s = status, code, retry_after_s


@dataclass
class ServedModel:
    name: str
    version: str
    package: PackageConfig
    weights: bytes


class AddVersion(BaseModel):
    version: str = Field(description="Registered model version to load beside the current one.")
    replicas: int | None = Field(default=None, ge=1, le=64, description="Default: the server's --replicas.")
    share: float = Field(default=0.0, ge=0, le=1, description="Share of new traffic once loaded.")


class Traffic(BaseModel):
    shares: dict[str, float] = Field(description="version -> share of new requests (normalised).")


def error_response(exc: Exception) -> Response:
    """Every error leaves as {"error": {"code", "message"}} with the right status."""
    retry_after = None
    if isinstance(exc, ApiError):
        status, code, retry_after = exc.status, exc.code, exc.retry_after_s
    elif isinstance(exc, PayloadError):
        status, code = exc.status, exc.code
    elif isinstance(exc, Overloaded):
        status, code, retry_after = 503, "overloaded", exc.retry_after_s
    elif isinstance(exc, ReplicaError):
        status, code = 500, "model_error"
    elif isinstance(exc, MMSError):
        status, code = 400, "bad_request"
    else:
        status, code = 500, "internal_error"
        log.exception("unexpected error", exc_info=exc)
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    body = orjson.dumps({"error": {"code": code, "message": str(exc)}})
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def create_app(
    *,
    config: ServeConfig,
    model: ServedModel,
    scheduler_address: str,
    keys: KeyStore | None,
    meter: UsageMeter | None,
    loader: Loader | None = None,
) -> FastAPI:
    """The server for ``model``; replicas start on the Dask cluster at ``scheduler_address``."""
    metrics = ServingMetrics()
    quota = QuotaLimiter()
    schema = InputSchema(
        features=model.package.features,
        mean=model.package.mean,
        max_rows=config.max_rows,
        nan_policy=config.nan_policy,
    )
    state: dict[str, Router] = {}
    # Inputs and predictions per version, for drift monitoring (GET /v1/models/{name}/stats). Per
    # version: each bins on its own training mean/std, as its training statistics were binned.
    monitors = {model.version: _monitor(model.version, model.package)}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Straight to the replicas' workers: relaying each call through the scheduler costs a hop.
        client = await Client(scheduler_address, asynchronous=True, direct_to_workers=True)
        router = Router(client=client, name=model.name, config=config, metrics=metrics)
        state["router"] = router
        app.state.router = router  # read by the serving lease (server.hold_serving_lease)
        if meter is not None:
            meter.start()
        try:
            await router.add_version(
                version=model.version, package=model.package, weights=model.weights,
                replicas=config.replicas, share=1.0,
            )  # fmt: skip
            log.info("serving %s v%s with %d replicas", model.name, model.version, config.replicas)
            # Everything loaded so far (torch, mlflow, pandas) lives as long as the server: move it
            # out of the collector's sight, or each full collection pauses requests 150-290 ms.
            gc.collect()
            gc.freeze()
            yield
        finally:
            await router.close(drain_timeout_s=config.drain_timeout_s)
            try:
                if meter is not None:
                    meter.close()  # the final flush: no counts lost on a clean stop
            except MMSError:
                log.exception("usage counters could not be written at shutdown")
            finally:
                await client.close()

    app = FastAPI(title="MMS online predictor", lifespan=lifespan)

    def authenticate(request: Request, *, admin: bool = False) -> ApiKey | None:
        header = request.headers.get("authorization")
        if header is None:
            if config.auth_required:
                raise ApiError(
                    401, "missing_key",
                    "this server requires `Authorization: Bearer KEY`; create one with `mms keys create`",
                )  # fmt: skip
            return None
        scheme, _, token = header.partition(" ")
        key = keys.verify(token.strip()) if keys is not None and scheme.lower() == "bearer" else None
        if key is None:
            raise ApiError(401, "invalid_key", "unknown or malformed API key (expected `Bearer mms_...`)")
        if key.revoked:
            raise ApiError(403, "revoked_key", f"API key {key.key_id} was revoked; ask for a new one")
        if admin and not key.admin:
            raise ApiError(403, "not_admin", f"API key {key.key_id} may not call the admin API")
        return key

    async def predict(request: Request, endpoint: str, name: str) -> Response:
        t0 = time.perf_counter()
        router = state["router"]
        version = None
        try:
            key = authenticate(request)
            if name != model.name:
                raise ApiError(
                    404, "unknown_model", f"model {name!r} is not served here; served: {model.name!r}"
                )
            x = parse_body(await _json_body(request, config.max_body_bytes), schema)
            if key is not None and key.quota_rows_per_min:
                wait = quota.try_acquire(key_id=key.key_id, rows=len(x), limit_per_min=key.quota_rows_per_min)
                if wait > 0:
                    raise ApiError(
                        429, "over_quota",
                        f"key {key.key_id} is over its quota of {key.quota_rows_per_min} rows/min",
                        retry_after_s=wait,
                    )  # fmt: skip
            reply = await router.predict(x)
            version = reply.version
            if meter is not None:
                meter.record(
                    key_id=key.key_id if key else None, model=model.name, version=reply.version,
                    rows=len(x), compute_ms=reply.compute_ms,
                )  # fmt: skip
            metrics.rows.labels(version=reply.version).inc(len(x))
            if reply.version in monitors:
                monitors[reply.version].update(x, reply.labels)
            predictions = reply.labels.tolist()
            body = {"predictions": predictions, "model": model.name, "version": reply.version}
            response = Response(orjson.dumps(body), media_type="application/json")
        except Exception as exc:
            response = error_response(exc)
            version = getattr(exc, "version", None)
            metrics.errors.labels(code=str(response.status_code)).inc()
        elapsed = time.perf_counter() - t0
        metrics.requests.labels(endpoint=endpoint, code=str(response.status_code)).inc()
        metrics.latency.labels(endpoint=endpoint).observe(elapsed)
        if version is not None:
            router.record(version, elapsed * 1e3, ok=response.status_code < 500)
        return response

    @app.post("/v1/models/{name}/predict", summary="Predict rows with the served model")
    async def predict_v1(name: str, request: Request) -> Response:
        return await predict(request, "predict", name)

    @app.get("/v1/models/{name}/stats", summary="Running input statistics and predicted-class counts")
    async def stats(name: str, request: Request, version: str | None = None) -> Response:
        try:
            authenticate(request)
            if name != model.name:
                raise ApiError(
                    404, "unknown_model", f"model {name!r} is not served here; served: {model.name!r}"
                )
            version = version or model.version
            if version not in monitors:
                raise ApiError(
                    404, "unknown_version",
                    f"no statistics of version {version}: this server has served {sorted(monitors)}",
                )  # fmt: skip
            return Response(monitors[version].snapshot().model_dump_json(), media_type="application/json")
        except Exception as exc:
            return error_response(exc)

    @app.post("/invocations", summary="MLflow scoring protocol (inputs, instances, dataframe_split)")
    async def invocations(request: Request) -> Response:
        return await predict(request, "invocations", model.name)

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, object]:
        return {"status": "ok", "replicas": state["router"].replica_table() if "router" in state else []}

    @app.get("/ready", summary="Readiness: every version's replicas have loaded")
    async def ready() -> Response:
        router = state.get("router")
        if router is None or not router.ready:
            return error_response(ApiError(503, "not_ready", "replicas are still loading", retry_after_s=1))
        return Response(
            orjson.dumps({"status": "ready", "shares": router.shares()}), media_type="application/json"
        )

    @app.get("/ping", summary="MLflow scoring-server readiness probe (same as /ready)")
    async def ping() -> Response:
        return await ready()

    @app.get("/version", summary="Served model and version (MLflow scoring-server compatible)")
    async def version() -> dict[str, object]:
        return {"model": model.name, "versions": sorted(state["router"].shares())}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        router = state.get("router")
        text = metrics.render(router.replica_table() if router else [])
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", summary="Served models, versions, traffic shares and replicas")
    async def models() -> dict[str, object]:
        router = state["router"]
        versions = [
            {"version": v, "share": s, "replicas": [r for r in router.replica_table() if r["version"] == v]}
            for v, s in router.shares().items()
        ]
        return {"models": [{"name": model.name, "features": len(schema.features), "versions": versions}]}

    _admin_routes(
        app, state=state, authenticate=authenticate, loader=loader, config=config, monitors=monitors
    )
    _error_handlers(app)
    return app


def _monitor(version: str, package: PackageConfig) -> RunningStats:
    return RunningStats(features=package.features, mean=package.mean, std=package.std, version=version)


def _admin_routes(
    app: FastAPI, *, state, authenticate, loader: Loader | None, config: ServeConfig, monitors: dict
) -> None:
    @app.post("/admin/versions", summary="Load another registered version beside the current one")
    async def add_version(body: AddVersion, request: Request) -> dict[str, object]:
        authenticate(request, admin=True)
        if loader is None:
            raise ApiError(400, "no_registry", "this server was started without a registry to load from")
        package, weights, version = await asyncio.to_thread(loader, body.version)
        monitors.setdefault(version, _monitor(version, package))
        router = state["router"]
        await router.add_version(
            version=version, package=package, weights=weights,
            replicas=body.replicas or config.replicas, share=body.share,
        )  # fmt: skip
        return {"version": version, "shares": router.shares()}

    @app.put("/admin/traffic", summary="Set each version's share of new requests")
    async def traffic(body: Traffic, request: Request) -> dict[str, object]:
        authenticate(request, admin=True)
        await state["router"].set_traffic(body.shares)
        return {"shares": state["router"].shares()}

    @app.delete("/admin/versions/{version}", summary="Drain a version's replicas and stop serving it")
    async def remove_version(version: str, request: Request) -> dict[str, object]:
        authenticate(request, admin=True)
        await state["router"].remove_version(version, drain_timeout_s=config.drain_timeout_s)
        return {"removed": version, "shares": state["router"].shares()}

    @app.get("/admin/stats", summary="Per-version request count, error rate and latency over a window")
    async def stats(request: Request, window_s: float = 30.0) -> dict[str, object]:
        authenticate(request, admin=True)
        router = state["router"]
        return {"shares": router.shares(), "versions": {v: router.stats(v, window_s) for v in router.pools}}


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MMSError)
    async def mms_error(request: Request, exc: MMSError) -> Response:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(ApiError(exc.status_code, "http_error", str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(ApiError(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}"))


async def _json_body(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadError(
            f"body of {declared} bytes is over the {limit}-byte limit", status=413, code="too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadError(
                f"body is over the {limit}-byte limit; split the batch", status=413, code="too_large"
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:  # Python clients write NaN/Infinity tokens, which orjson refuses: let the NaN policy decide
            return json.loads(raw)
        except ValueError:
            raise PayloadError(f"body is not valid JSON: {exc}") from None
