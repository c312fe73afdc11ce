"""Run a process-group job (one rank per Dask worker) and fail over when a worker dies.

Used by every strategy built on torch.distributed collectives (ddp, hierarchical, fsdp): each
gives a picklable ``rank_fn(job, *, rank, world_size, emit) -> RankResult``; this module picks
the workers, hosts the TCP rendezvous on rank 0's worker, relays metrics events to the caller's
thread and watches the ranks. param_server (actors and worker tasks, no process group) shares
its worker choice, its watch (:class:`Watch`) and its fail-over.

Each rank runs in a process of its own that the Dask task on its worker starts and supervises
(rank_process.py), so a job leaves the cluster's workers, and whatever else they host, alone:
it never restarts one.

Fail-over: when a rank's worker leaves the cluster (killed, out of memory, node lost), the job
sets its stop event, which kills the surviving ranks' processes (stuck in a collective with the
dead one), waits a little for a replacement worker, and starts the group again from the last
checkpoint (the rank loop resumes by itself) on the workers there are then, up to
``training.max_restarts`` times. Each restart is reported as a ``restart`` event with the
steps that will be repeated.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from distributed import Client, Event, get_worker, secede

from mms_core.errors import TrainingError
from mms_core.training.rank_process import rank_call, supervise
from mms_core.training.spec import RankResult, TrainJob

OnEvent = Callable[[dict[str, Any]], None]
RankFn = Callable[..., RankResult]
REPLACEMENT_WAIT_S = 30.0
LOSS_GRACE_S = 10.0  # a rank's error may reach us before the scheduler notices its worker died
WIND_DOWN_S = 15.0  # how long a stopped job waits for its ranks' tasks to end before going on
# How often a watch looks at the futures it waits for: often for param_server's actor calls (the
# driver's snapshot is on the training's path), seldom for ranks, whose CPU it would take on small
# machines; and how often it asks the scheduler whether the job's workers are still there.
POLL_S, RANK_POLL_S = 0.01, 0.2
LIVENESS_EVERY_S = 1.0


class WorkerLost(TrainingError):
    """A worker hosting a rank left the cluster mid-run."""

    def __init__(self, gone: list[str], *, remaining: int, group: int) -> None:
        super().__init__(f"worker(s) {gone} left the cluster during training")
        # remaining: workers in the cluster now (a nanny's replacement for the lost one may already
        # be among them); group: workers the run had, the size a restart hopes to get back to
        self.remaining, self.group = remaining, group
        self.step = 0  # the last checkpointed step, where the caller knows it


def run_process_group(
    *, client: Client, job: TrainJob, rank_fn: RankFn, on_event: OnEvent | None = None
) -> list[RankResult]:
    """Run ``rank_fn`` on ``job.train.world_size`` workers (default all); restart on worker loss.

    Returns every rank's result in rank order. Raises TrainingError when there are no workers,
    a rank fails for another reason, or the restarts are used up.
    """
    last_step = 0

    def relay(ev: dict[str, Any]) -> None:
        nonlocal last_step
        if ev.get("kind") in ("progress", "epoch"):
            last_step = max(last_step, ev.get("step", 0))
        if on_event:
            on_event(ev)

    for attempt in range(1, job.train.max_restarts + 2):
        try:
            # after a loss, train on the workers there are if fewer than training.world_size came back
            return _launch_once(
                client=client, job=job, rank_fn=rank_fn, on_event=relay, allow_fewer=attempt > 1
            )
        except WorkerLost as exc:
            fail_over(client, exc, job=job, attempt=attempt, last_step=last_step, emit=relay)
    raise AssertionError("unreachable: the loop returns or raises")


def fail_over(
    client: Client, exc: WorkerLost, *, job: TrainJob, attempt: int, last_step: int, emit: OnEvent
) -> None:
    """After a lost worker: give up once ``training.max_restarts`` restarts are spent, else emit the
    ``restart`` event and wait a little for a replacement (a nanny restarts a killed process; a
    cluster manager may add a worker), so the run keeps its world size when it can and repeats
    exactly what an uninterrupted run would have done. No worker is restarted."""
    if attempt > job.train.max_restarts:
        raise TrainingError(
            f"{exc}; gave up after {attempt - 1} restart(s) (training.max_restarts={job.train.max_restarts})"
        ) from exc
    emit({"kind": "restart", "attempt": attempt, "reason": str(exc), "last_step": last_step})
    with contextlib.suppress(TimeoutError):
        client.wait_for_workers(max(1, exc.group), timeout=REPLACEMENT_WAIT_S)
    if not rank_workers(client):
        raise TrainingError(f"{exc}; no worker is left to train on") from exc


def _launch_once(
    *, client: Client, job: TrainJob, rank_fn: RankFn, on_event: OnEvent, allow_fewer: bool
) -> list[RankResult]:
    chosen = choose_workers(client, job=job, allow_fewer=allow_fewer)
    world_size = len(chosen)
    port = client.submit(_free_port, workers=[chosen[0]], pure=False).result()
    master = f"{urlsplit(chosen[0]).hostname}:{port}"
    topic = f"mms-train-{uuid.uuid4().hex[:8]}"
    stop = Event(f"{topic}-stop", client=client)
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    client.subscribe_topic(topic, lambda ev: events.put(ev[1]))
    futures = [
        client.submit(
            _rank_task,
            rank_call(job=job, rank_fn=rank_fn, rank=r, world_size=world_size, master=master),
            topic=topic,
            workers=[w],
            allow_other_workers=False,
            pure=False,
            key=f"{topic}-rank{r}",
        )
        for r, w in enumerate(chosen)
    ]
    try:
        results = Watch(client, workers=chosen, tasks=futures, events=events, on_event=on_event).wait(futures)
        _drain(events, on_event)
        return results
    finally:
        stop.set()  # ranks still running (after a failure or a loss) kill their processes
        _wind_down(client, futures, chosen)
        client.unsubscribe_topic(topic)
        client.cancel(futures)
        stop.clear()  # the scheduler keeps a set event for ever; cancelled ranks never start


def _wind_down(client: Client, futures: list, chosen: list[str]) -> None:
    """Wait (up to WIND_DOWN_S) for the ranks' tasks on live workers to end, so that a restarted
    group does not share its workers with the processes of the one before."""
    deadline = time.monotonic() + WIND_DOWN_S
    while time.monotonic() < deadline:
        alive = set(worker_addresses(client))
        if all(f.done() or w not in alive for f, w in zip(futures, chosen, strict=True)):
            return
        time.sleep(0.1)


def choose_workers(client: Client, *, job: TrainJob, allow_fewer: bool = False) -> list[str]:
    """The workers that host ranks 0..world_size-1 (``training.world_size``, default all), by address;
    with ``allow_fewer``, all there are when that is fewer than ``training.world_size``."""
    workers = rank_workers(client)
    if not workers:
        raise TrainingError(
            "the Dask cluster has no workers; start some (mms stack up, MMS_N_WORKERS) and retry"
        )
    world_size = job.train.world_size or len(workers)
    if world_size > len(workers) and not allow_fewer:
        raise TrainingError(f"training.world_size={world_size} but the cluster has {len(workers)} workers")
    return workers[:world_size]


def worker_addresses(client: Client) -> list[str]:
    """The addresses of the workers the scheduler knows now, sorted."""
    return sorted(_workers_info(client))


def rank_workers(client: Client) -> list[str]:
    """The workers that may host a training rank, sorted: those advertising the Dask resource
    ``GPU`` (``dask cuda worker --resources GPU=1``) when the cluster has any, else all of them.
    CPU workers beside GPU ones still run ingest, prediction and tuning trials."""
    info = _workers_info(client)
    gpu = [addr for addr, w in info.items() if (w.get("resources") or {}).get("GPU", 0) > 0]
    return sorted(gpu or info)


def _workers_info(client: Client) -> dict[str, dict[str, Any]]:
    # Asks the scheduler directly: ``client.scheduler_info()`` returns a cache that the client's
    # periodic refresh (every 2 s, fetched with no workers) may overwrite between the fetch and
    # the return, so it sometimes reads as "no workers" (a false worker loss, seen in CI under load).
    return client.sync(client.scheduler.identity, n_workers=-1)["workers"]


class Watch:
    """Waits for futures (rank results, actor calls) while watching a job's tasks and workers: a
    failed task or a lost worker ends the wait at once (TrainingError, WorkerLost), since the
    other ranks would otherwise sit in a collective, or on a parameter shard, until a timeout.

    A rank whose peer died fails with a broken collective, sometimes before the scheduler has
    noticed the dead worker: an error that looks like that gets LOSS_GRACE_S to turn into a
    WorkerLost before it is blamed on the rank.
    """

    def __init__(
        self,
        client: Client,
        *,
        workers: list[str],
        tasks: list,
        events: queue.Queue | None = None,
        on_event: OnEvent | None = None,
        what: str = "rank",
        calls: str = "a rank's result",
        poll_s: float = RANK_POLL_S,
    ) -> None:
        self.client, self.workers, self.tasks, self.what, self.calls = client, workers, tasks, what, calls
        self.events, self.on_event = events, on_event
        self.poll_s, self.checked = poll_s, 0.0
        self.failed_at: float | None = None

    def wait(self, futures: list) -> list:
        """The futures' results, once all are done; raises as soon as the job fails."""
        while not all(f.done() for f in futures):
            if self.events is not None and self.on_event:
                _drain(self.events, self.on_event)
            if time.monotonic() - self.checked > LIVENESS_EVERY_S:
                self.checked = time.monotonic()
                self.raise_if_lost()
            self._raise_if_failed()
            time.sleep(self.poll_s)
        self._raise_if_failed(finished=True)
        try:
            return [f.result() for f in futures]
        except Exception as exc:  # an actor's worker died, or the call raised
            self._blame_lost_worker(exc)
            raise TrainingError(f"{self.calls} failed: {exc!r}") from exc

    def raise_if_lost(self) -> None:
        alive = set(worker_addresses(self.client))
        if gone := sorted(set(self.workers) - alive):
            raise WorkerLost(gone, remaining=len(alive), group=len(self.workers))

    def _raise_if_failed(self, *, finished: bool = False) -> None:
        errors = [(i, f) for i, f in enumerate(self.tasks) if f.status in ("error", "cancelled", "lost")]
        if not errors:
            return
        text = " ".join(repr(f.exception()) for _, f in errors if f.status == "error")
        if looks_like_lost_peer(text):
            self.failed_at = self.failed_at or time.monotonic()
            if finished:  # nothing left to wait for: give the scheduler its grace now
                self._blame_lost_worker(None)
            elif time.monotonic() - self.failed_at <= LOSS_GRACE_S:
                return
        i, f = errors[0]
        exc = f.exception() if f.status == "error" else None
        why = f"failed: {exc}" if exc else f"ended as {f.status}"
        raise TrainingError(f"{self.what} {i} {why}") from exc

    def _blame_lost_worker(self, exc: BaseException | None) -> None:
        """Raise WorkerLost if a worker of the job is gone, or goes within LOSS_GRACE_S when the
        error looks like a lost peer (a task's own bug gets no grace)."""
        grace = LOSS_GRACE_S if exc is None or looks_like_lost_peer(repr(exc)) else 0.0
        deadline = time.monotonic() + grace
        while True:
            self.raise_if_lost()
            if time.monotonic() >= deadline:
                return
            time.sleep(0.2)


def looks_like_lost_peer(error_text: str) -> bool:
    """True when an error looks like a broken connection to a peer that died (a collective, an
    actor on another worker), not the task's own bug."""
    text = error_text.lower()
    return any(
        s in text for s in ("connection", "gloo", "nccl", "timed out", "closed", "killedworker", "peer")
    )


def _drain(events: queue.Queue, on_event: OnEvent) -> None:
    while True:
        try:
            ev = events.get_nowait()
        except queue.Empty:
            return
        on_event(ev)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rank_task(call: dict[str, Any], *, topic: str) -> RankResult:
    """Runs on a Dask worker: the rank in a process of its own (rank_process.py); its events go
    out as this worker's events on ``topic``; the job's stop event ends it."""
    worker = get_worker()
    stop = Event(f"{topic}-stop")
    # The rank computes in its own process: this task only relays, so it gives its slot in the
    # worker's thread pool back to other tasks (the cluster's other tenants) while it waits.
    secede()
    return supervise(
        call,
        emit=lambda ev: worker.log_event(topic, ev),
        stopped=stop.is_set,
        name=f"rank {call['rank']}",
    )
