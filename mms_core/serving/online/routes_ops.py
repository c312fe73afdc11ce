"""Operations routes: liveness, readiness (also MLflow's /ping), /version, Prometheus /metrics and
the list of served versions with their replicas."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from fastapi.responses import Response

from mms_core.serving.online.errors import ApiError, error_response, responses
from mms_core.serving.online.runtime import ServingRuntime


def ops_routes(runtime: ServingRuntime) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/health", summary="Liveness: the process answers; per-replica queue and health")
    async def health() -> dict[str, object]:
        return {"status": "ok", "replicas": runtime.router.replica_table() if runtime.router else []}

    @router.get(
        "/ready", summary="Readiness: every version's replicas have loaded",
        response_model=None, responses={200: {"description": "Ready"}, **responses(503)},
    )  # fmt: skip
    async def ready() -> Response:
        router = runtime.router
        if router is None or not router.ready:
            return error_response(ApiError(503, "not_ready", "no healthy replica yet", retry_after_s=1))
        body = orjson.dumps({"status": "ready", "shares": router.shares()})
        return Response(body, media_type="application/json")

    @router.get(
        "/ping", summary="MLflow scoring-server readiness probe (same as /ready)",
        response_model=None, responses={200: {"description": "Ready"}, **responses(503)},
    )  # fmt: skip
    async def ping() -> Response:
        return await ready()

    @router.get("/version", summary="Served model and versions (MLflow scoring-server compatible)")
    async def version() -> dict[str, object]:
        return {"model": runtime.model.name, "versions": sorted(runtime.router.shares())}

    @router.get(
        "/metrics", summary="Prometheus metrics", response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )  # fmt: skip
    async def prometheus() -> Response:
        text = runtime.metrics.render(runtime.router.replica_table() if runtime.router else [])
        return Response(text, media_type="text/plain; version=0.0.4")

    @router.get("/v1/models", summary="Served models, versions, traffic shares and replicas")
    async def models() -> dict[str, object]:
        table = runtime.router.replica_table()
        versions = [
            {"version": v, "share": s, "replicas": [r for r in table if r["version"] == v]}
            for v, s in runtime.router.shares().items()
        ]
        features = len(runtime.model.package.features)
        return {"models": [{"name": runtime.model.name, "features": features, "versions": versions}]}

    return router
