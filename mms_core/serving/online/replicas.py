"""The replica set: model replicas as Dask actors on the cluster's workers. It starts them (spread
over the least used workers), checks their health, and takes out a replica that fails a call, a
health check, holds a call past the request deadline, or whose worker Dask reports lost; the router
is told (``on_lost``) so it can retry that replica's requests, queued and in flight, elsewhere and
start a replacement.

Dask reports a lost worker within tens of milliseconds (the actor's future leaves "finished"), while
a call already sent there may hang in connection retries for as long as Dask's connect timeout:
:meth:`ReplicaSet.sweep` turns the report into a take-out, so no request waits on a dead worker."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from distributed import Client, Future

from mms_core.errors import MMSError
from mms_core.packaging import PackageConfig
from mms_core.serving.online.batcher import Batcher, Pending
from mms_core.serving.online.config import ServeConfig
from mms_core.serving.online.metrics import ServingMetrics
from mms_core.serving.online.replica import Replica

log = logging.getLogger("mms.serving")
SUSPECT_S = 60.0
LOAD_TIMEOUT_S = 120.0  # a replacement that does not load in this long is tried elsewhere


@dataclass(eq=False)
class ReplicaState:
    id: str
    version: str
    future: Future
    actor: object
    batcher: Batcher
    healthy: bool = True
    ewma_ms: float = 1.0
    resources: dict[str, float] = field(default_factory=dict)  # from the last health check

    @property
    def address(self) -> str | None:
        return getattr(self.actor, "_address", None)

    @property
    def alive(self) -> bool:
        """Healthy, and Dask has not reported its worker (hence the actor) lost."""
        return self.healthy and self.future.status == "finished"

    def score(self) -> float:
        """Outstanding work weighted by recent latency: the router sends to the lowest."""
        return (len(self.batcher.queue) + self.batcher.inflight_requests + 1) * self.ewma_ms

    def observe(self, rows: int, ms: float) -> None:
        self.ewma_ms = 0.8 * self.ewma_ms + 0.2 * ms

    def row(self) -> dict[str, object]:
        return {
            "id": self.id,
            "version": self.version,
            "worker": self.address,
            "healthy": self.healthy,
            "queued": len(self.batcher.queue),
            "inflight": self.batcher.inflight_requests,
            "latency_ms": round(self.ewma_ms, 3),
            **self.resources,
        }


OnLost = Callable[[ReplicaState, list[Pending], str], None]


class ReplicaSet:
    """Starts, watches and releases replicas; see the module docstring."""

    def __init__(
        self, *, client: Client, name: str, config: ServeConfig, metrics: ServingMetrics, on_lost: OnLost
    ) -> None:
        self.client = client  # asynchronous=True, on the server's event loop
        self.name, self.config, self.metrics = name, config, metrics
        self._on_lost = on_lost
        self._suspect: dict[str, float] = {}  # worker address -> until when new replicas avoid it
        # Every batcher that may still hold requests, released replicas' too (a call in flight there
        # still has requests waiting on it): the router's deadline sweep covers them all.
        self.batchers: weakref.WeakSet[Batcher] = weakref.WeakSet()

    async def spawn(
        self, *, version: str, package: PackageConfig, weights: bytes, worker: str
    ) -> ReplicaState:
        """A loaded replica of ``version`` on ``worker`` (or another, if that one is gone)."""
        rid = f"{self.name}-v{version}-{uuid.uuid4().hex[:6]}"
        # Scattered per replica, not once per version: a copy held by a worker that dies would
        # take every later replacement down with it ("lost dependencies").
        data = await self.client.scatter(weights, hash=False, workers=[worker])
        future = self.client.submit(
            Replica, package.model_dump_json(), data, version,
            actor=True, key=rid, workers=[worker], allow_other_workers=True,
        )  # fmt: skip
        actor = await future
        state: ReplicaState | None = None

        # The batcher and its replica refer to each other: the callbacks close over ``state``.
        def lost(items: list[Pending], why: str) -> None:
            self.fail(state, why, items)

        def observe(rows: int, ms: float) -> None:
            self.metrics.batch_rows.labels(version=version).observe(rows)
            state.observe(rows, ms)

        cfg = self.config
        batcher = Batcher(
            replica_id=rid, version=version, max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms,
            max_inflight_batches=cfg.max_inflight_batches, call_timeout_s=cfg.request_timeout_s,
            call=actor.predict, on_lost=lost, observe=observe,
        )  # fmt: skip
        state = ReplicaState(id=rid, version=version, future=future, actor=actor, batcher=batcher)
        self.batchers.add(batcher)
        batcher.start()
        log.info("replica %s loaded on %s", rid, state.address)
        return state

    async def placement(self, n: int, *, running: Iterable[ReplicaState]) -> list[str]:
        """Workers for ``n`` new replicas: the least used first, so replicas spread over workers."""
        # An asynchronous client's scheduler_info() is a cache without workers: ask the scheduler.
        workers = list((await self.client.scheduler.identity(n_workers=-1))["workers"])
        if not workers:
            raise MMSError(
                "the Dask cluster has no workers; start some (`mms stack up`) or check the address"
            )
        used = dict.fromkeys(workers, 0)
        for r in running:
            if r.address in used:
                used[r.address] += 1
        now = time.monotonic()
        # A worker that just lost a replica may be hung rather than gone: a replacement there could
        # hang too. Avoid it for a while, unless it is the only one.
        suspect = {w: self._suspect.get(w, 0.0) > now for w in workers}
        chosen = []
        for _ in range(n):
            worker = min(workers, key=lambda w: (suspect[w], used[w], random.random()))
            used[worker] += 1
            chosen.append(worker)
        return chosen

    def fail(self, r: ReplicaState, why: str, items: list[Pending] = ()) -> None:
        """Take ``r`` out (once) and hand ``items`` and its queued and in-flight requests to
        ``on_lost``: a call in flight on a lost replica may hang until its timeout, and a prediction
        is pure, so it is retried now (whichever answer comes first is the one sent)."""
        pending = list(items)
        if r.healthy:
            log.warning("replica %s taken out: %s", r.id, why)
            if r.address:
                self._suspect[r.address] = time.monotonic() + SUSPECT_S
            self.metrics.replica_failures.labels(version=r.version).inc()
            pending += r.batcher.take_all() + r.batcher.inflight()
            self.release(r)
        pending = list(dict.fromkeys(pending))  # ``items`` are in flight too: each request once
        for p in pending:
            p.tried.add(r.id)
        self._on_lost(r, pending, why)

    def sweep(self, replicas: Iterable[ReplicaState]) -> None:
        """Take out every healthy replica whose worker Dask has reported lost (no network call)."""
        for r in replicas:
            if r.healthy and not r.alive:
                self.fail(r, f"its worker left the cluster (Dask reports the actor {r.future.status})")

    def release(self, r: ReplicaState) -> None:
        r.healthy = False
        r.batcher.stop()
        r.future.release()

    async def check(self, replicas: list[ReplicaState]) -> None:
        """One health round: probe each replica; take out those that fail or hold an overdue call."""
        failures = await asyncio.gather(*(self._probe(r) for r in replicas))
        for r, why in zip(replicas, failures, strict=True):
            if why and r.healthy:
                self.fail(r, f"health check failed: {why}")

    async def _probe(self, r: ReplicaState) -> str | None:
        overdue = r.batcher.oldest_call_s()
        if overdue > self.config.request_timeout_s:
            return f"a call has run {overdue:.1f} s, past the {self.config.request_timeout_s} s deadline"
        try:  # even reading r.actor.health raises once Dask knows the worker is gone
            report = await asyncio.wait_for(_call(r.actor.health), self.config.health_timeout_s)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        r.resources = {k: float(report[k]) for k in ("rss_bytes", "cpu_seconds", "batches", "rows")}
        return None


async def _call(method, *args):
    return await method(*args)
