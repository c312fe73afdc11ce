"""Run the online server in this process: load the model from the registry, start uvicorn.

uvicorn handles SIGTERM/SIGINT: it stops accepting connections, lets in-flight requests finish
(up to ``drain_timeout_s``), then the app's shutdown drains the replica queues, flushes usage
counters and releases the replicas.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from mms_core import registry
from mms_core.serving.lease import LEASE_TTL_S, new_lease_id, remove_lease, write_lease
from mms_core.serving.metering import KeyStore, UsageMeter
from mms_core.serving.online.app import ServedModel, create_app
from mms_core.serving.online.config import ServeConfig


def metering_path(home: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    return home / "metering.db"


def build_server(
    *, config: ServeConfig, model: str, tracking_uri: str, scheduler_address: str, home: Path
) -> uvicorn.Server:
    """A uvicorn server for ``model`` (NAME@ALIAS or NAME/VERSION); ``.run()`` blocks until stopped.

    Raises:
        ModelLoadError: the model is not in the registry.
    """
    package, weights, version = registry.load_package(tracking_uri=tracking_uri, model=model)
    name = model.removeprefix("models:/").split("@")[0].split("/")[0]
    db = metering_path(home)
    app = create_app(
        config=config,
        model=ServedModel(name=name, version=version, package=package, weights=weights),
        scheduler_address=scheduler_address,
        keys=KeyStore(path=db),
        meter=UsageMeter(path=db, flush_interval_s=config.metering_flush_s),
        loader=lambda v: registry.load_package(tracking_uri=tracking_uri, model=f"{name}/{v}"),
    )
    hold_serving_lease(app, home=home, name=name, version=version)
    logging.getLogger("mms.serving").setLevel(logging.INFO)
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="info",
            access_log=False,  # per-request logs cost more than the model call; /metrics counts them
            timeout_graceful_shutdown=int(config.drain_timeout_s) or None,
            limit_concurrency=None,
        )
    )


def serve_forever(server: uvicorn.Server) -> None:
    """Run ``server`` until SIGTERM/SIGINT, in a fresh context.

    The caller usually holds a synchronous Dask client (``with dask_client(...)``), which is then
    the *current* client (a contextvar) of whatever runs here. The replicas' Dask actors would
    bind to it, their replies would complete on that client's thread, and uvicorn's event loop
    would only notice at its next 100 ms tick: +100 ms on every request. In a fresh context the
    actors bind to the server's own asynchronous client (bench/serving.py measured both).
    """
    contextvars.Context().run(server.run)


def hold_serving_lease(
    app: FastAPI, *, home: Path, name: str, version: str, ttl_s: float = LEASE_TTL_S
) -> None:
    """While ``app`` runs, keep a lease under ``home`` naming the versions it serves (retention
    never deletes a leased version); the lease is removed when the app shuts down.

    The versions are re-read from the app's router at each refresh, so a rollout's new version
    is covered within ``ttl_s / 4`` and a removed one is released.
    """
    inner = app.router.lifespan_context
    lease_id = new_lease_id()

    def served() -> list[str]:
        router = getattr(app.state, "router", None)
        return sorted(router.pools) if router is not None else [version]  # loading and draining too

    async def refresh() -> None:
        while True:
            write_lease(home=home, lease_id=lease_id, model=name, versions=served(), ttl_s=ttl_s)
            await asyncio.sleep(ttl_s / 4)

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[None]:
        # Claimed before the replicas load: the model must not vanish while it is being served.
        write_lease(home=home, lease_id=lease_id, model=name, versions=[version], ttl_s=ttl_s)
        try:
            async with inner(a) as state:
                task = asyncio.create_task(refresh())
                try:
                    yield state
                finally:
                    task.cancel()
                    with suppress(asyncio.CancelledError):
                        await task
        finally:
            remove_lease(home=home, lease_id=lease_id)

    app.router.lifespan_context = lifespan
