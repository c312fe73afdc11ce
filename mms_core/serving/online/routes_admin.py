"""The admin API a rollout drives: load another version, set traffic shares, drain and remove a
version, per-version request stats. Every route needs an admin key, loopback included."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from mms_core.serving.online.auth import Auth
from mms_core.serving.online.errors import responses
from mms_core.serving.online.runtime import ServingRuntime


class AddVersion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=64, description="Registered model version to load.")
    replicas: int | None = Field(default=None, ge=1, le=64, description="Default: the server's --replicas.")
    share: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False, description="Share once loaded.")


class Traffic(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shares: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        min_length=1, description="version -> share of new requests (finite, >= 0; normalised to sum 1)."
    )


ADMIN_ERRORS = responses(400, 401, 403, 404, 409, 422)


def admin_routes(runtime: ServingRuntime, auth: Auth) -> APIRouter:
    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(auth.admin)])

    @router.post(
        "/versions", summary="Load another registered version beside the current one", responses=ADMIN_ERRORS
    )
    async def add_version(body: AddVersion) -> dict[str, object]:
        version = await runtime.add_version(version=body.version, replicas=body.replicas, share=body.share)
        return {"version": version, "shares": runtime.router.shares()}

    @router.put("/traffic", summary="Set each version's share of new requests", responses=ADMIN_ERRORS)
    async def traffic(body: Traffic) -> dict[str, object]:
        await runtime.router.set_traffic(body.shares)
        return {"shares": runtime.router.shares()}

    @router.delete(
        "/versions/{version}",
        summary="Drain a version's replicas and stop serving it",
        responses=ADMIN_ERRORS,
    )
    async def remove_version(version: str) -> dict[str, object]:
        await runtime.router.remove_version(version, drain_s=runtime.config.drain_s)
        return {"removed": version, "shares": runtime.router.shares()}

    @router.get(
        "/stats", summary="Per-version requests, error rate and latency over a window", responses=ADMIN_ERRORS
    )
    async def stats(window_s: float = Query(30.0, gt=0, le=86_400, allow_inf_nan=False)) -> dict[str, object]:
        router = runtime.router
        versions = {p.version: router.pools.stats(p.version, window_s) for p in router.pools.all()}
        return {"shares": router.shares(), "versions": versions}

    return router
