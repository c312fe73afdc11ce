"""The router ("scheduler center"): which replica answers each request.

Model replicas are Dask actors (``replica.Replica``) on the cluster's workers, grouped by model
version ("pools"). For each request the router picks a pool by its traffic share (canary
rollout), then the healthy replica with the least outstanding work weighted by its recent
latency, and queues the request there. Each replica's queue is drained by a batcher that stacks
queued requests into one forward pass (dynamic batching). It sends at once when the replica is
idle (no added latency at low load); while a batch is in flight it waits up to ``max_wait_ms``
for a fuller one. Batching here, in front of the replica, costs one Dask message per batch
instead of one per request, and keeps every queue depth in one place for load shedding.

A replica that fails a call or a health check is taken out at once, its queued and in-flight
requests are retried on the others (predictions are pure, so a retry is safe), and a
replacement is started. Written by hand: no library routes to Dask actors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from distributed import Client, Future

from mms_core.errors import MMSError
from mms_core.packaging import PackageConfig
from mms_core.serving.online.config import ServeConfig
from mms_core.serving.online.metrics import ServingMetrics
from mms_core.serving.online.replica import Replica

log = logging.getLogger("mms.serving")
MAX_ATTEMPTS = 3


class Overloaded(MMSError):
    """Every replica's queue is full (or none is healthy): answer 503 with Retry-After."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ReplicaError(MMSError):
    """The model itself raised on a batch (not a lost replica): answer 500."""

    def __init__(self, message: str, *, version: str) -> None:
        super().__init__(message)
        self.version = version


@dataclass(frozen=True)
class Reply:
    labels: np.ndarray
    version: str
    replica: str
    compute_ms: float


@dataclass(eq=False)
class _Pending:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float
    tried: set[str] = field(default_factory=set)


@dataclass(eq=False)
class ReplicaState:
    id: str
    version: str
    future: Future
    actor: object
    queue: deque[_Pending] = field(default_factory=deque)
    queued_rows: int = 0
    inflight_batches: int = 0
    inflight_requests: int = 0
    ewma_ms: float = 1.0
    healthy: bool = True
    resources: dict[str, float] = field(default_factory=dict)  # from the last health check
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    def score(self) -> float:
        return (len(self.queue) + self.inflight_requests + 1) * self.ewma_ms


@dataclass(eq=False)
class VersionPool:
    version: str
    package: PackageConfig
    weights: bytes
    wanted: int
    share: float
    replicas: list[ReplicaState] = field(default_factory=list)
    loaded: bool = False
    removing: bool = False
    window: deque[tuple[float, float, bool]] = field(default_factory=lambda: deque(maxlen=200_000))


class Router:
    """Routes row batches to model replicas on Dask; see the module docstring."""

    def __init__(self, *, client: Client, name: str, config: ServeConfig, metrics: ServingMetrics) -> None:
        self.client = client  # asynchronous=True, on the server's event loop
        self.name = name
        self.config = config
        self.metrics = metrics
        self.pools: dict[str, VersionPool] = {}
        self.closed = False
        self._health_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    # ---- versions -------------------------------------------------------------------------
    async def add_version(
        self, *, version: str, package: PackageConfig, weights: bytes, replicas: int, share: float
    ) -> None:
        """Start ``replicas`` replicas of ``version`` and give it ``share`` of new traffic once loaded."""
        if version in self.pools:
            raise MMSError(f"version {version} is already served; remove it first or pick another")
        for other in self.pools.values():
            if other.package.features != package.features:
                raise MMSError(
                    f"version {version} takes different features than version {other.version}; "
                    "a rollout must keep the input schema (serve it under another name)"
                )
        pool = VersionPool(version=version, package=package, weights=weights, wanted=replicas, share=0.0)
        self.pools[version] = pool
        try:
            workers = await self._placement(replicas)
            states = await asyncio.gather(*(self._spawn(pool, w) for w in workers))
        except Exception as exc:
            del self.pools[version]
            raise MMSError(f"version {version} failed to load on the workers: {exc}") from exc
        pool.replicas.extend(states)
        pool.loaded = True
        await self.set_traffic({**self.shares(), version: share})
        if self._health_task is None:
            self._health_task = asyncio.create_task(self._health_loop())

    def shares(self) -> dict[str, float]:
        return {v: p.share for v, p in self.pools.items() if not p.removing}

    async def set_traffic(self, shares: dict[str, float]) -> None:
        """Set each version's share of new requests (normalised to sum 1)."""
        unknown = [v for v in shares if v not in self.pools or self.pools[v].removing]
        if unknown:
            raise MMSError(f"unknown version(s) {unknown}; served: {sorted(self.shares())}")
        if any(s < 0 for s in shares.values()) or sum(shares.values()) <= 0:
            raise MMSError(f"traffic shares must be >= 0 and sum to more than 0, got {shares}")
        total = sum(shares.values())
        for version, share in shares.items():
            self.pools[version].share = share / total

    async def remove_version(self, version: str, *, drain_timeout_s: float) -> None:
        """Stop routing to ``version``, let its queued and in-flight requests finish, release it."""
        pool = self.pools.get(version)
        if pool is None:
            raise MMSError(f"version {version} is not served; served: {sorted(self.pools)}")
        rest = {v: s for v, s in self.shares().items() if v != version}
        if not rest and not self.closed:
            raise MMSError(f"version {version} is the only one served; add another before removing it")
        if rest and sum(rest.values()) == 0:
            rest = dict.fromkeys(rest, 1.0)
        pool.removing = True
        if rest:
            await self.set_traffic(rest)
        await self._drain(pool.replicas, drain_timeout_s)
        for r in pool.replicas:
            self._release(r)
        del self.pools[version]

    # ---- requests -------------------------------------------------------------------------
    async def predict(self, x: np.ndarray) -> Reply:
        """Labels for ``x``; raises Overloaded (503), ReplicaError (500) or TimeoutError."""
        if self.closed:
            raise Overloaded("the server is shutting down", retry_after_s=5)
        item = _Pending(x=x, future=asyncio.get_running_loop().create_future(), enqueued=time.monotonic())
        self._dispatch(item, self._pick_pool())
        return await item.future

    def _pick_pool(self) -> VersionPool | None:
        pools = [p for p in self.pools.values() if p.loaded and not p.removing and p.share > 0]
        if not pools:
            return None
        return random.choices(pools, weights=[p.share for p in pools])[0]

    def _dispatch(self, item: _Pending, pool: VersionPool | None) -> None:
        rows = len(item.x)
        order = [pool] if pool else []
        order += [p for p in self.pools.values() if p is not pool and p.loaded and not p.removing]
        full = False
        for p in order:  # the chosen version first; others only if it has no healthy replica left
            live = [r for r in p.replicas if r.healthy and r.id not in item.tried]
            room = [r for r in live if r.queued_rows + rows <= self.config.max_queue_rows]
            full = full or bool(live and not room)
            if room:
                best = min(room, key=lambda r: (r.score(), random.random()))
                best.queue.append(item)
                best.queued_rows += rows
                best.wake.set()
                return
        if full:
            exc = Overloaded("every replica's queue is full; retry shortly", retry_after_s=1)
        else:
            exc = Overloaded("no healthy replica can take the request; retry shortly", retry_after_s=2)
        if not item.future.done():
            item.future.set_exception(exc)

    async def _batch_loop(self, r: ReplicaState) -> None:
        cfg = self.config
        while r.healthy:
            if not r.queue or r.inflight_batches >= cfg.max_inflight_batches:
                r.wake.clear()
                await r.wake.wait()
                continue
            if r.inflight_batches and r.queued_rows < cfg.max_batch_size and cfg.max_wait_ms:
                # Busy replica: give the next batch a moment to fill instead of sending a sliver.
                left = r.queue[0].enqueued + cfg.max_wait_ms / 1e3 - time.monotonic()
                if left > 0:
                    r.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(r.wake.wait(), left)
                    continue
            batch = [r.queue.popleft()]
            rows = len(batch[0].x)
            while r.queue and rows + len(r.queue[0].x) <= cfg.max_batch_size:
                rows += len(r.queue[0].x)
                batch.append(r.queue.popleft())
            r.queued_rows -= rows
            r.inflight_batches += 1
            r.inflight_requests += len(batch)
            self._spawn_bg(self._send(r, batch, rows))

    async def _send(self, r: ReplicaState, batch: list[_Pending], rows: int) -> None:
        x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
        t0 = time.monotonic()
        try:
            labels, compute_ms = await asyncio.wait_for(
                _call(r.actor.predict, x), self.config.request_timeout_s
            )
        except (OSError, TimeoutError) as exc:  # lost worker, closed comm, hung replica
            self._fail(r, f"predict call failed: {type(exc).__name__}: {exc}", retry=batch)
            return
        except Exception as exc:  # the model raised: the replica is fine, these requests are not
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(
                        ReplicaError(
                            f"model version {r.version} failed on this batch: {exc}", version=r.version
                        )
                    )
            return
        finally:
            r.inflight_batches -= 1
            r.inflight_requests -= len(batch)
            r.wake.set()
        ms = (time.monotonic() - t0) * 1e3
        r.ewma_ms = 0.8 * r.ewma_ms + 0.2 * ms
        self.metrics.batch_rows.labels(version=r.version).observe(rows)
        start = 0
        for p in batch:
            n = len(p.x)
            if not p.future.done():
                p.future.set_result(Reply(labels[start : start + n], r.version, r.id, compute_ms * n / rows))
            start += n

    # ---- replicas -------------------------------------------------------------------------
    async def _spawn(self, pool: VersionPool, worker: str) -> ReplicaState:
        rid = f"{self.name}-v{pool.version}-{uuid.uuid4().hex[:6]}"
        # Scattered per replica, not once per version: a copy held by a worker that dies would
        # take every later replacement down with it ("lost dependencies").
        weights = await self.client.scatter(pool.weights, hash=False, workers=[worker])
        future = self.client.submit(
            Replica,
            pool.package.model_dump_json(),
            weights,
            pool.version,
            actor=True,
            key=rid,
            workers=[worker],
            allow_other_workers=True,
        )
        actor = await future
        state = ReplicaState(id=rid, version=pool.version, future=future, actor=actor)
        state.task = asyncio.create_task(self._batch_loop(state))
        log.info("replica %s loaded on %s", rid, getattr(actor, "_address", "?"))
        return state

    async def _placement(self, n: int) -> list[str]:
        """Workers for ``n`` new replicas: the least used first, so replicas spread over workers."""
        # An asynchronous client's scheduler_info() is a cache without workers: ask the scheduler.
        workers = list((await self.client.scheduler.identity(n_workers=-1))["workers"])
        if not workers:
            raise MMSError(
                "the Dask cluster has no workers; start some (`mms stack up`) or check the address"
            )
        used = dict.fromkeys(workers, 0)
        for pool in self.pools.values():
            for r in pool.replicas:
                address = getattr(r.actor, "_address", None)
                if address in used:
                    used[address] += 1
        chosen = []
        for _ in range(n):
            worker = min(workers, key=lambda w: (used[w], random.random()))
            used[worker] += 1
            chosen.append(worker)
        return chosen

    def _fail(self, r: ReplicaState, why: str, *, retry: list[_Pending] = ()) -> None:
        """Take ``r`` out, retry its requests elsewhere, and start a replacement."""
        pending = list(retry)
        if r.healthy:
            r.healthy = False
            log.warning("replica %s taken out: %s", r.id, why)
            self.metrics.replica_failures.labels(version=r.version).inc()
            pending += list(r.queue)
            r.queue.clear()
            r.queued_rows = 0
            r.wake.set()
            pool = self.pools.get(r.version)
            if pool is not None and r in pool.replicas:
                pool.replicas.remove(r)
                if not pool.removing and not self.closed:
                    self._spawn_bg(self._replace(pool))
            self._release(r)
        for p in pending:
            p.tried.add(r.id)
            if len(p.tried) >= MAX_ATTEMPTS:
                p.future.set_exception(
                    Overloaded(f"{MAX_ATTEMPTS} replicas failed this request", retry_after_s=2)
                )
            elif not p.future.done():
                self._dispatch(p, self.pools.get(r.version))

    async def _replace(self, pool: VersionPool) -> None:
        for attempt in range(5):
            try:
                state = await self._spawn(pool, (await self._placement(1))[0])
            except Exception as exc:
                log.warning("replacement replica for v%s failed (%s); retrying", pool.version, exc)
                await asyncio.sleep(2**attempt)
                continue
            if pool.removing or self.closed:
                self._release(state)
            else:
                pool.replicas.append(state)
            return

    def _release(self, r: ReplicaState) -> None:
        r.healthy = False
        if r.task is not None:
            r.task.cancel()
        r.future.release()

    async def _health_loop(self) -> None:
        while not self.closed:
            await asyncio.sleep(self.config.health_interval_s)
            replicas = [r for p in self.pools.values() for r in p.replicas if r.healthy]
            failures = await asyncio.gather(*(self._probe(r) for r in replicas))
            for r, why in zip(replicas, failures, strict=True):
                if why:
                    self._fail(r, f"health check failed: {why}")

    async def _probe(self, r: ReplicaState) -> str | None:
        try:  # even reading r.actor.health raises once Dask knows the worker is gone
            report = await asyncio.wait_for(_call(r.actor.health), self.config.health_timeout_s)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        r.resources = {k: float(report[k]) for k in ("rss_bytes", "cpu_seconds", "batches", "rows")}
        return None

    # ---- status and shutdown ----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        # A canary still loading does not make the server unready: its traffic share is still 0.
        active = [p for p in self.pools.values() if p.loaded and not p.removing]
        return bool(active) and all(any(r.healthy for r in p.replicas) for p in active)

    def record(self, version: str, latency_ms: float, ok: bool) -> None:
        pool = self.pools.get(version)
        if pool is not None:
            pool.window.append((time.monotonic(), latency_ms, ok))

    def stats(self, version: str, window_s: float) -> dict[str, float | int]:
        """Requests, error rate and latency percentiles of ``version`` over the last ``window_s``."""
        pool = self.pools.get(version)
        if pool is None:
            raise MMSError(f"version {version} is not served; served: {sorted(self.pools)}")
        since = time.monotonic() - window_s
        recent = [(ms, ok) for t, ms, ok in pool.window if t >= since]
        ms = np.asarray([m for m, _ in recent]) if recent else np.zeros(1)
        errors = sum(1 for _, ok in recent if not ok)
        return {
            "requests": len(recent),
            "errors": errors,
            "error_rate": errors / len(recent) if recent else 0.0,
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)),
        }

    def replica_table(self) -> list[dict[str, object]]:
        return [
            {
                "id": r.id,
                "version": r.version,
                "healthy": r.healthy,
                "queued": len(r.queue),
                "inflight": r.inflight_requests,
                "latency_ms": round(r.ewma_ms, 3),
                **r.resources,
            }
            for p in self.pools.values()
            for r in p.replicas
        ]

    async def close(self, *, drain_timeout_s: float) -> None:
        """Refuse new requests, finish the queued and in-flight ones, release every replica."""
        self.closed = True
        if self._health_task is not None:
            self._health_task.cancel()
        replicas = [r for p in self.pools.values() for r in p.replicas]
        await self._drain(replicas, drain_timeout_s)
        for r in replicas:
            self._release(r)
        for t in list(self._background):
            t.cancel()

    async def _drain(self, replicas: list[ReplicaState], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(r.healthy and (r.queue or r.inflight_requests) for r in replicas):
            if time.monotonic() > deadline:
                log.warning("drain timed out after %.1f s", timeout_s)
                return
            await asyncio.sleep(0.01)

    def _spawn_bg(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)  # keep a reference: the loop holds tasks only weakly
        task.add_done_callback(self._background.discard)


async def _call(method, *args):
    return await method(*args)
