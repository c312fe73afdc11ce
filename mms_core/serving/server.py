"""Run the online server in this process: load the model from the registry, start uvicorn.

uvicorn handles SIGTERM/SIGINT: it stops accepting connections, lets in-flight requests finish
(up to ``drain_timeout_s``), then the app's shutdown drains the replica queues, flushes usage
counters and releases the replicas.
"""

from __future__ import annotations

import contextvars
import logging
from pathlib import Path

import uvicorn

from mms_core import registry
from mms_core.serving.app import ServedModel, create_app
from mms_core.serving.config import ServeConfig
from mms_core.serving.metering import KeyStore, UsageMeter


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
