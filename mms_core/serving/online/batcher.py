"""Dynamic batching in front of one replica: a queue of requests, drained into forward passes.

It sends at once when the replica is idle (no added latency at low load); while a batch is in
flight it waits up to ``max_wait_ms`` for a fuller one. Batching here, in front of the replica,
costs one Dask message per batch instead of one per request, and keeps every queue depth in one
place for load shedding.

Isolation: every request is checked to be a float32 ``[rows, width]`` matrix before it may join a
queue, so stacking a batch cannot fail; a batch the model raises on (``ModelFailed``) is retried
request by request, so only the request that breaks the model gets the error; a call that fails any
other way (a dead or closing worker, a closed connection) or does not return within the request
deadline is handed back (``on_lost``) and the replica is taken out. Whatever happens, the queued and
in-flight counts return to zero. Written by hand: no library batches onto Dask actors.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from mms_core.serving.online.errors import ReplicaError
from mms_core.serving.online.replica import ModelFailed


@dataclass(frozen=True)
class Reply:
    labels: np.ndarray
    version: str
    replica: str
    compute_ms: float


@dataclass(eq=False)
class Pending:
    """One request on its way: its rows, the future its handler awaits, its deadline."""

    x: np.ndarray
    future: asyncio.Future
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)
    tried: set[str] = field(default_factory=set)
    batcher: Batcher | None = None  # the queue it waits in, while it waits in one

    @property
    def rows(self) -> int:
        return len(self.x)

    def settle(self, *, result: Reply | None = None, error: BaseException | None = None) -> None:
        """Answer the request once; later answers (a retry that raced a deadline) are dropped."""
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


# rows -> (labels, compute ms); raises ModelFailed when the model raised, anything else: replica lost
Call = Callable[[np.ndarray], Awaitable[tuple[np.ndarray, float]]]
# Lost = the call itself failed (lost worker, closed comm, past the deadline): the replica is the problem.
# Requests handed back once are marked (their ``tried`` holds this replica) and never handed back again.
Lost = Callable[[list[Pending], str], None]
Observe = Callable[[int, float], None]  # rows, round-trip ms of a successful batch


class Batcher:
    """The queue and batch loop of one replica (``replica_id`` serves ``version``)."""

    def __init__(
        self,
        *,
        replica_id: str,
        version: str,
        max_batch_size: int,
        max_wait_ms: float,
        max_inflight_batches: int,
        call_timeout_s: float,
        call: Call,
        on_lost: Lost,
        observe: Observe,
    ) -> None:
        self.replica_id, self.version = replica_id, version
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self.max_inflight_batches, self.call_timeout_s = max_inflight_batches, call_timeout_s
        self._call, self._on_lost, self._observe = call, on_lost, observe
        self.queue: deque[Pending] = deque()
        self.queued_rows = 0
        self.inflight_requests = 0
        self._inflight_started: dict[int, float] = {}  # batch number -> monotonic start
        self._inflight_items: dict[int, list[Pending]] = {}
        self._batches = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sends: set[asyncio.Task] = set()
        self.open = True

    # ---- the queue ------------------------------------------------------------------------
    def submit(self, item: Pending) -> None:
        item.batcher = self
        self.queue.append(item)
        self.queued_rows += item.rows
        self._wake.set()

    def withdraw(self, item: Pending) -> bool:
        """Take a still-queued ``item`` out (its deadline passed); False if it was already sent."""
        if item.batcher is not self:
            return False
        try:
            self.queue.remove(item)
        except ValueError:
            return False
        self.queued_rows -= item.rows
        item.batcher = None
        return True

    def take_all(self) -> list[Pending]:
        """Empty the queue (the replica is going away) and hand back what waited in it."""
        items = list(self.queue)
        self.queue.clear()
        self.queued_rows = 0
        for item in items:
            item.batcher = None
        return items

    def inflight(self) -> list[Pending]:
        """The unanswered requests of every call in flight (they stay counted until it returns)."""
        return [p for batch in self._inflight_items.values() for p in batch if not p.future.done()]

    def abort(self, error: BaseException) -> None:
        """Answer every queued and in-flight request with ``error`` now (a late reply is dropped)."""
        for item in self.take_all() + [p for batch in self._inflight_items.values() for p in batch]:
            item.settle(error=error)

    def expire(self, now: float, error: Callable[[], BaseException]) -> int:
        """Answer every queued or in-flight request whose deadline is past with ``error()``; the
        queued ones leave the queue (their slots free at once). Returns how many."""
        late = [p for p in self.queue if p.deadline <= now]
        for p in late:
            self.withdraw(p)
        late += [p for batch in self._inflight_items.values() for p in batch if p.deadline <= now]
        for p in late:
            p.settle(error=error())
        return len(late)

    def oldest_call_s(self) -> float:
        """Seconds the oldest call in flight has run (0 when none)."""
        if not self._inflight_started:
            return 0.0
        return time.monotonic() - min(self._inflight_started.values())

    # ---- the loop -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    def stop(self) -> None:
        self.open = False
        self._wake.set()
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        while self.open:
            if not self.queue or len(self._inflight_started) >= self.max_inflight_batches:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._inflight_started and self.queued_rows < self.max_batch_size and self.max_wait_ms:
                # Busy replica: give the next batch a moment to fill instead of sending a sliver.
                left = self.queue[0].enqueued + self.max_wait_ms / 1e3 - time.monotonic()
                if left > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), left)
                    continue
            batch = self._next_batch()
            # Counted in flight here, before the send task first runs: counted there, the loop would
            # see nothing in flight and send the next sliver at once (no batching, more messages).
            self._batches += 1
            number = self._batches
            self._inflight_started[number] = time.monotonic()
            self._inflight_items[number] = batch
            self.inflight_requests += len(batch)
            task = asyncio.create_task(self._send(number, batch))
            self._sends.add(task)  # the loop holds tasks only weakly
            task.add_done_callback(self._sends.discard)

    def _next_batch(self) -> list[Pending]:
        batch = [self.queue.popleft()]
        rows = batch[0].rows
        while self.queue and rows + self.queue[0].rows <= self.max_batch_size:
            rows += self.queue[0].rows
            batch.append(self.queue.popleft())
        self.queued_rows -= rows
        for item in batch:
            item.batcher = None
        return batch

    async def _send(self, number: int, batch: list[Pending]) -> None:
        try:
            await self._forward(batch)
        finally:  # whatever happened, the counts go back
            del self._inflight_started[number], self._inflight_items[number]
            self.inflight_requests -= len(batch)
            self._wake.set()

    async def _forward(self, batch: list[Pending]) -> None:
        live = [p for p in batch if not p.future.done()]  # a request past its deadline is not sent
        if not live:
            return
        x = live[0].x if len(live) == 1 else np.concatenate([p.x for p in live])
        t0 = time.monotonic()
        try:
            labels, compute_ms = await asyncio.wait_for(self._call(x), self.call_timeout_s)
        except ModelFailed as exc:  # the model raised: the replica is fine, one of these requests is not
            if len(live) > 1:
                for p in live:  # find the one: each alone, the rest still answered
                    await self._forward([p])
                return
            live[0].settle(
                error=ReplicaError(f"model version {self.version} failed: {exc}", version=self.version)
            )
            return
        except Exception as exc:  # anything else is the replica's: lost or closing worker, closed comm,
            # "cannot schedule new futures after shutdown", a call past the deadline
            left = [p for p in live if self.replica_id not in p.tried]  # not handed back already
            if left or self.open:
                self._on_lost(left, f"predict call failed: {type(exc).__name__}: {exc}")
            return
        rows = len(x)
        self._observe(rows, (time.monotonic() - t0) * 1e3)
        start = 0
        for p in live:
            part = labels[start : start + p.rows]
            p.settle(result=Reply(part, self.version, self.replica_id, compute_ms * p.rows / rows))
            start += p.rows
