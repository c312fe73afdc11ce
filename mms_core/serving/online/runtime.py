"""What lives as long as the online server: the asynchronous Dask client, the router, the usage
meter, the serving lease, per-version input statistics and the server-wide request cap. Its
``lifespan`` is the app's: everything starts before the first request and stops after the last."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from distributed import Client
from fastapi import FastAPI

from mms_core.errors import ModelLoadError
from mms_core.monitoring.stats import RunningStats
from mms_core.packaging import PackageConfig
from mms_core.serving.lease import held_lease
from mms_core.serving.metering import QuotaLimiter, UsageMeter
from mms_core.serving.online.config import ServeConfig
from mms_core.serving.online.errors import Conflict, Overloaded, UnknownVersion
from mms_core.serving.online.metrics import ServingMetrics
from mms_core.serving.online.router import Router
from mms_core.serving.payload import InputSchema

log = logging.getLogger("mms.serving")
Loader = Callable[[str], tuple[PackageConfig, bytes, str]]  # version -> (package, weights, version)


@dataclass
class ServedModel:
    name: str
    version: str
    package: PackageConfig
    weights: bytes


class ServingRuntime:
    """See the module docstring. ``home``: where the serving lease is kept (None: no lease)."""

    def __init__(
        self,
        *,
        config: ServeConfig,
        model: ServedModel,
        scheduler_address: str,
        meter: UsageMeter | None,
        loader: Loader | None,
        home: Path | None,
    ) -> None:
        self.config, self.model, self.meter, self.loader, self.home = config, model, meter, loader, home
        self.scheduler_address = scheduler_address
        self.metrics = ServingMetrics()
        self.quota = QuotaLimiter()
        package = model.package
        self.schema = InputSchema(
            features=package.features,
            mean=package.mean,
            max_rows=max_request_rows(config),
            nan_policy=config.nan_policy,
        )
        # Inputs and predictions per version, for drift monitoring (GET /v1/models/{name}/stats). Per
        # version: each bins on its own training mean/std, as its training statistics were binned.
        self.monitors = {model.version: _monitor(model.version, package)}
        self.router: Router | None = None
        self.inflight = 0
        self._drain_timer: asyncio.TimerHandle | None = None

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if self.home is not None:  # claimed before the replicas load: the model must not vanish
                await stack.enter_async_context(
                    held_lease(home=self.home, model=self.model.name, versions=self._served)
                )
            # Straight to the replicas' workers: relaying each call through the scheduler costs a hop.
            client = await Client(self.scheduler_address, asynchronous=True, direct_to_workers=True)
            stack.push_async_callback(client.close)
            self.router = Router(
                client=client, name=self.model.name, config=self.config, metrics=self.metrics
            )
            if self.meter is not None:
                self.meter.start()
                stack.callback(self._close_meter)
            stack.push_async_callback(self._close_router)
            m = self.model
            await self.router.add_version(
                version=m.version,
                package=m.package,
                weights=m.weights,
                replicas=self.config.replicas,
                share=1.0,
            )
            log.info("serving %s v%s with %d replicas", m.name, m.version, self.config.replicas)
            # Everything loaded so far (torch, mlflow, pandas) lives as long as the server: move it
            # out of the collector's sight, or each full collection pauses requests 150-290 ms.
            gc.collect()
            gc.freeze()
            yield

    def _served(self) -> list[str]:
        return self.router.versions() if self.router is not None else [self.model.version]

    async def _close_router(self) -> None:
        if self._drain_timer is not None:  # SIGTERM started the drain: what is left gets 503 now
            self._drain_timer.cancel()
            drain_s = 0.0
        else:
            drain_s = self.config.drain_s
        await self.router.close(drain_s=drain_s)

    def _close_meter(self) -> None:
        try:
            self.meter.close()  # the final flush: no counts lost on a clean stop
        except Exception:
            log.exception("usage counters could not be written at shutdown")

    def begin_drain(self) -> None:
        """SIGTERM: requests in flight get ``drain_s``; then whatever is still waiting is answered 503
        (so uvicorn's connections close and the process exits within the drain period)."""
        if self.router is None or self._drain_timer is not None:
            return
        reason = f"the server is shutting down (drain period of {self.config.drain_s} s is over)"
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a signal outside the server's loop: uvicorn's own timeout still holds
            return
        self._drain_timer = loop.call_later(self.config.drain_s, self.router.abort_pending, reason)

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """One of at most ``max_concurrent_requests`` prediction requests in the server; beyond: 503."""
        if self.inflight >= self.config.max_concurrent_requests:
            raise Overloaded(
                f"{self.inflight} requests in progress, the limit of this server "
                "(MMS_SERVE_MAX_CONCURRENT_REQUESTS); retry shortly",
                retry_after_s=1,
            )
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def add_version(self, *, version: str, replicas: int | None, share: float) -> str:
        """Load registered ``version`` beside the served ones; returns the version as resolved."""
        if self.loader is None:
            raise Conflict("this server was started without a registry to load versions from")
        try:
            package, weights, resolved = await asyncio.to_thread(self.loader, version)
        except ModelLoadError as exc:
            raise UnknownVersion(f"version {version} cannot be loaded from the registry: {exc}") from exc
        self.monitors.setdefault(resolved, _monitor(resolved, package))
        await self.router.add_version(
            version=resolved, package=package, weights=weights,
            replicas=replicas or self.config.replicas, share=share,
        )  # fmt: skip
        return resolved


def max_request_rows(config: ServeConfig) -> int:
    """Most rows one request may carry (413 beyond): no more than a replica's queue holds, or it
    could never be queued and would be told to retry forever."""
    return min(config.max_rows, config.max_queue_rows)


def _monitor(version: str, package: PackageConfig) -> RunningStats:
    return RunningStats(features=package.features, mean=package.mean, std=package.std, version=version)
