"""The router ("scheduler center"): which replica answers each request.

It composes three parts that do not import each other: the pools (versions, traffic shares, the
rollout stats window), the replica set (spawn, placement, health, replace) and one batcher per
replica (queue -> forward pass). For each request it picks a pool by traffic share (canary
rollout), then the healthy replica with the least outstanding work weighted by its recent
latency, and queues the request there. Every request carries a deadline: past it the request is
taken out of its queue and answered 504. A replica that is lost (a failed call or health check, or
its worker reported gone by Dask, watched every ``WATCH_S``) has its queued and in-flight requests
retried on the others (predictions are pure, so a retry is safe) and a replacement started, retried
until it loads. While a version has no replica left and a replacement is loading (one replica, or
all of them lost at once), requests wait for it within their deadline instead of getting 503.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import numpy as np
from distributed import Client

from mms_core.packaging import PackageConfig
from mms_core.serving.online.batcher import Pending, Reply
from mms_core.serving.online.config import ServeConfig
from mms_core.serving.online.errors import Conflict, DeadlineExceeded, Overloaded
from mms_core.serving.online.metrics import ServingMetrics
from mms_core.serving.online.pools import Pools, VersionPool
from mms_core.serving.online.replicas import LOAD_TIMEOUT_S, ReplicaSet, ReplicaState
from mms_core.serving.payload import PayloadError

log = logging.getLogger("mms.serving")
MAX_ATTEMPTS = 3
WATCH_S = 0.05  # how often the router looks for replicas whose worker Dask reports lost
REPLACE_BACKOFF_MAX_S = 10.0


class Router:
    """Routes row batches to model replicas on Dask; see the module docstring."""

    def __init__(self, *, client: Client, name: str, config: ServeConfig, metrics: ServingMetrics) -> None:
        self.name, self.config, self.metrics = name, config, metrics
        self.pools = Pools()
        self.replicas = ReplicaSet(
            client=client, name=name, config=config, metrics=metrics, on_lost=self._replica_lost
        )
        self.closed = False
        self._health_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._deadline_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._replacing: dict[str, int] = {}  # version -> replacements loading
        self._waiting: list[Pending] = []  # requests held until a replacement loads (or deadline)

    # ---- versions -------------------------------------------------------------------------
    async def add_version(
        self, *, version: str, package: PackageConfig, weights: bytes, replicas: int, share: float
    ) -> None:
        """Start ``replicas`` replicas of ``version`` and give it ``share`` of new traffic once loaded."""
        pool = VersionPool(version=version, package=package, weights=weights, wanted=replicas)
        self.pools.add(pool)
        try:
            workers = await self.replicas.placement(replicas, running=self._all_replicas())
            states = await asyncio.gather(*(self._spawn(pool, w) for w in workers))
        except Exception as exc:
            self.pools.remove(version)
            raise Conflict(f"version {version} failed to load on the workers: {exc}") from exc
        pool.replicas.extend(states)
        pool.loaded = True
        self.pools.set_shares({**self.pools.shares(), version: share})
        if self._health_task is None:
            self._health_task = asyncio.create_task(self._health_loop())
            self._watch_task = asyncio.create_task(self._watch_loop())

    async def set_traffic(self, shares: dict[str, float]) -> None:
        """Set each version's share of new requests (normalised to sum 1)."""
        self.pools.set_shares(shares)

    async def remove_version(self, version: str, *, drain_s: float) -> None:
        """Stop routing to ``version``, let its queued and in-flight requests finish, release it."""
        pool = self.pools.require(version)
        rest = {v: s for v, s in self.pools.shares().items() if v != version}
        if not rest:
            raise Conflict(f"version {version} is the only one served; add another before removing it")
        if sum(rest.values()) == 0:
            rest = dict.fromkeys(rest, 1.0)
        pool.removing = True
        self.pools.set_shares(rest)
        await self._drain(pool.replicas, drain_s)
        for r in list(pool.replicas):  # what the drain left goes to the other versions
            self._replica_lost(r, r.batcher.take_all(), f"version {version} was removed")
            self.replicas.release(r)
        self.pools.remove(version)

    # ---- requests -------------------------------------------------------------------------
    async def predict(self, x: np.ndarray) -> Reply:
        """Labels for ``x`` (float32 ``[rows, width]``).

        Raises:
            Overloaded: (503) full queues, no healthy replica, shutting down.
            DeadlineExceeded: (504) not answered within ``request_timeout_s``.
            ReplicaError: (500) the model raised on this request.
        """
        if self.closed:
            raise Overloaded("the server is shutting down", retry_after_s=5)
        loop = asyncio.get_running_loop()
        item = Pending(
            x=x, future=loop.create_future(), deadline=time.monotonic() + self.config.request_timeout_s
        )
        self._dispatch(item, self.pools.pick())
        if self._deadline_task is None:
            self._deadline_task = asyncio.create_task(self._deadline_loop())
        # Deadlines are enforced by one sweeper (_deadline_loop), not a timer per request: a timer
        # and its extra wake-up per request cost the server throughput (bench.serving's revision A/B).
        return await item.future

    async def _deadline_loop(self) -> None:
        """Every tick, answer 504 to the requests past their deadline (queued: their slots free)."""
        timeout = self.config.request_timeout_s
        tick = min(0.1, timeout / 10)

        def late() -> DeadlineExceeded:
            return DeadlineExceeded(
                f"no answer within {timeout} s (MMS_SERVE_REQUEST_TIMEOUT_S); retry, or send smaller batches"
            )

        while not self.closed:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for batcher in list(self.replicas.batchers):
                batcher.expire(now, late)
            if self._waiting:
                late_ones = [p for p in self._waiting if p.deadline <= now]
                self._waiting = [p for p in self._waiting if p.deadline > now]
                for p in late_ones:
                    p.settle(error=late())

    def _dispatch(self, item: Pending, pool: VersionPool | None) -> None:
        full = False
        for p in self.pools.in_order(pool):  # the chosen version; others only if it has no replica left
            if item.x.ndim != 2 or item.x.shape[1] != p.width or item.x.dtype != np.float32:
                item.settle(error=PayloadError(f"rows must be float32 [n, {p.width}], got {item.x.shape}"))
                return  # cannot join a batch: fails alone, before any queue
            live = [r for r in p.replicas if r.alive and r.id not in item.tried]
            room = [r for r in live if r.batcher.queued_rows + item.rows <= self.config.max_queue_rows]
            full = full or bool(live and not room)
            if room:
                min(room, key=lambda r: (r.score(), random.random())).batcher.submit(item)
                return
        if not full and self._wait_for_replacement(item, self.pools.in_order(pool)):
            return
        why = "every replica's queue is full" if full else "no healthy replica can take the request"
        item.settle(error=Overloaded(f"{why}; retry shortly", retry_after_s=1 if full else 2))

    def _wait_for_replacement(self, item: Pending, pools: list[VersionPool]) -> bool:
        """Hold ``item`` if one of ``pools`` has a replacement loading and the held rows stay within
        one replica's queue limit (``max_queue_rows``); True when held."""
        if not any(self._replacing.get(p.version) for p in pools):
            return False
        if sum(p.rows for p in self._waiting) + item.rows > self.config.max_queue_rows:
            return False
        self._waiting.append(item)
        return True

    def _release_waiting(self, pool: VersionPool) -> None:
        """A replacement for ``pool`` ended (loaded, or its version is being removed): route the
        held requests again; those with nowhere to go wait for another replacement or get 503."""
        waiting, self._waiting = self._waiting, []
        for item in waiting:
            if not item.future.done():
                self._dispatch(item, pool)

    def _replica_lost(self, r: ReplicaState, items: list[Pending], why: str) -> None:
        """The replica set took ``r`` out: retry its requests elsewhere, start a replacement."""
        pool = self.pools.get(r.version)
        if pool is not None and r in pool.replicas:
            pool.replicas.remove(r)
            if not pool.removing and not self.closed:
                # counted now: the requests handed back just below may wait for this replacement
                self._replacing[pool.version] = self._replacing.get(pool.version, 0) + 1
                self._background_task(self._replace(pool))
        now = time.monotonic()
        for p in items:
            if p.deadline <= now:
                p.settle(error=DeadlineExceeded(f"replica {r.id} failed and the deadline passed: {why}"))
            elif len(p.tried) >= MAX_ATTEMPTS:
                p.settle(error=Overloaded(f"{MAX_ATTEMPTS} replicas failed this request", retry_after_s=2))
            elif not p.future.done():
                self._dispatch(p, pool)

    async def _spawn(self, pool: VersionPool, worker: str) -> ReplicaState:
        return await self.replicas.spawn(
            version=pool.version, package=pool.package, weights=pool.weights, worker=worker
        )

    async def _replace(self, pool: VersionPool) -> None:
        """Start one replica in place of a lost one. Retried, backing off, until it loads (or the
        version is removed, or the server closes): giving up would leave the pool short for good."""
        try:
            await self._replace_until_loaded(pool)
        finally:
            self._replacing[pool.version] -= 1
            if not self._replacing[pool.version]:
                del self._replacing[pool.version]
            if not self.closed:  # loaded, or the version went: the held requests go where they can
                self._release_waiting(pool)

    async def _replace_until_loaded(self, pool: VersionPool) -> None:
        attempt = 0
        while not (pool.removing or self.closed):
            try:
                worker = (await self.replicas.placement(1, running=self._all_replicas()))[0]
                state = await asyncio.wait_for(self._spawn(pool, worker), LOAD_TIMEOUT_S)
            except Exception as exc:
                delay = min(2.0**attempt, REPLACE_BACKOFF_MAX_S)
                attempt += 1
                log.warning(
                    "replacement replica for v%s failed (%s); retrying in %.0f s", pool.version, exc, delay
                )
                await asyncio.sleep(delay)
                continue
            if pool.removing or self.closed:
                self.replicas.release(state)
            else:
                pool.replicas.append(state)
            return

    async def _watch_loop(self) -> None:
        while not self.closed:
            await asyncio.sleep(WATCH_S)
            self.replicas.sweep(self._all_replicas())

    async def _health_loop(self) -> None:
        while not self.closed:
            await asyncio.sleep(self.config.health_interval_s)
            await self.replicas.check([r for r in self._all_replicas() if r.healthy])

    # ---- status and shutdown ----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.pools.ready

    def shares(self) -> dict[str, float]:
        return self.pools.shares()

    def versions(self) -> list[str]:
        return sorted(self.pools.by_version)  # loading and draining ones too: all must stay leased

    def replica_table(self) -> list[dict[str, object]]:
        return [r.row() for r in self._all_replicas()]

    def _all_replicas(self) -> list[ReplicaState]:
        return [r for p in self.pools.all() for r in p.replicas]

    async def close(self, *, drain_s: float) -> None:
        """Refuse new requests, give queued and in-flight ones ``drain_s`` to finish, answer the rest
        503, release every replica."""
        self.closed = True
        for task in (self._health_task, self._watch_task, self._deadline_task):
            if task is not None:
                task.cancel()
        replicas = self._all_replicas()
        await self._drain(replicas, drain_s)
        self.abort_pending("the server is shutting down")
        for r in replicas:
            self.replicas.release(r)
        for t in list(self._background):
            t.cancel()

    def abort_pending(self, why: str) -> None:
        """Answer every queued, held and in-flight request 503 now (the drain period is over)."""
        for r in self._all_replicas():
            r.batcher.abort(Overloaded(why, retry_after_s=5))
        waiting, self._waiting = self._waiting, []
        for p in waiting:
            p.settle(error=Overloaded(why, retry_after_s=5))

    async def _drain(self, replicas: list[ReplicaState], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(r.healthy and (r.batcher.queue or r.batcher.inflight_requests) for r in replicas):
            if time.monotonic() > deadline:
                log.warning("drain timed out after %.1f s", timeout_s)
                return
            await asyncio.sleep(0.01)

    def _background_task(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)  # keep a reference: the loop holds tasks only weakly
        task.add_done_callback(self._background.discard)
