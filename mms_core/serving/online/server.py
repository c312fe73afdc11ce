"""Run the online server in this process: load the model from the registry, start uvicorn.

On SIGTERM/SIGINT uvicorn stops accepting connections and waits for the open ones; the runtime's
drain timer answers whatever is still waiting after ``drain_s`` with 503, so connections close and
the process exits within the drain period; then the app's shutdown flushes usage counters, releases
the replicas and the serving lease.
"""

from __future__ import annotations

import contextvars
import logging
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from mms_core import registry
from mms_core.serving.metering import KeyStore, UsageMeter, metering_path
from mms_core.serving.online.app import ServedModel, create_app
from mms_core.serving.online.config import ServeConfig
from mms_core.serving.online.runtime import ServingRuntime


class DrainingServer(uvicorn.Server):
    """uvicorn, plus: a stop signal starts the runtime's drain timer (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, *, runtime: ServingRuntime) -> None:
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig: int, frame: object) -> None:
        super().handle_exit(sig, frame)
        # Signal handlers run on the main thread between the loop's steps: the loop is this thread's.
        self.runtime.begin_drain()


def build_server(
    *, config: ServeConfig, model: str, tracking_uri: str, scheduler_address: str, home: Path
) -> DrainingServer:
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
        home=home,
    )
    logging.getLogger("mms.serving").setLevel(logging.INFO)
    return draining_server(app, config=config)


def draining_server(app: FastAPI, *, config: ServeConfig) -> DrainingServer:
    """uvicorn for an app made by ``create_app``, stopping within ``config.drain_s`` of a signal."""
    uv = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level="info",
        access_log=False,  # per-request logs cost more than the model call; /metrics counts them
        # A backstop only: the drain timer answers what is left at drain_s, so connections close by then.
        timeout_graceful_shutdown=int(config.drain_s) + 2,
        limit_concurrency=None,
    )
    return DrainingServer(uv, runtime=app.state.runtime)


def serve_forever(server: uvicorn.Server) -> None:
    """Run ``server`` until SIGTERM/SIGINT, in a fresh context.

    The caller usually holds a synchronous Dask client (``with dask_client(...)``), which is then
    the *current* client (a contextvar) of whatever runs here. The replicas' Dask actors would
    bind to it, their replies would complete on that client's thread, and uvicorn's event loop
    would only notice at its next 100 ms tick: +100 ms on every request. In a fresh context the
    actors bind to the server's own asynchronous client (bench/serving.py measured both).
    """
    contextvars.Context().run(server.run)
