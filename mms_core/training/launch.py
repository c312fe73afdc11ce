"""Run a process-group job (one rank per Dask worker) and fail over when a worker dies.

Used by every strategy built on torch.distributed collectives (ddp, hierarchical, fsdp): each
gives a picklable ``rank_fn(job, *, rank, world_size, emit) -> RankResult``; this module picks
the workers, hosts the TCP rendezvous on rank 0's worker, relays metrics events to the caller's
thread and watches the ranks.

Fail-over: when a rank's worker leaves the cluster (killed, out of memory, node lost), the
surviving ranks are stuck in a collective, so every worker is restarted and the group starts
again from the last checkpoint (the rank loop resumes by itself) on the workers there are then,
up to ``training.max_restarts`` times. Each restart is reported as a ``restart`` event with the
steps that will be repeated.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from distributed import Client, get_worker

from mms_core.errors import TrainingError
from mms_core.training.spec import RankResult, TrainJob

OnEvent = Callable[[dict[str, Any]], None]
RankFn = Callable[..., RankResult]
REPLACEMENT_WAIT_S = 30.0
LOSS_GRACE_S = 10.0  # a rank's error may reach us before the scheduler notices its worker died


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
    ``restart`` event and restart the workers (the caller then starts again from the last checkpoint)."""
    if attempt > job.train.max_restarts:
        raise TrainingError(
            f"{exc}; gave up after {attempt - 1} restart(s) (training.max_restarts={job.train.max_restarts})"
        ) from exc
    emit({"kind": "restart", "attempt": attempt, "reason": str(exc), "last_step": last_step})
    restart_workers(client, at_least=exc.remaining, hoped=max(exc.remaining, exc.group))


def _launch_once(
    *, client: Client, job: TrainJob, rank_fn: RankFn, on_event: OnEvent, allow_fewer: bool
) -> list[RankResult]:
    _ensure_fresh_workers(client)
    chosen = choose_workers(client, job=job, allow_fewer=allow_fewer)
    world_size = len(chosen)
    port = client.submit(_free_port, workers=[chosen[0]], pure=False).result()
    master = f"{urlsplit(chosen[0]).hostname}:{port}"
    topic = f"mms-train-{uuid.uuid4().hex[:8]}"
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    client.subscribe_topic(topic, lambda ev: events.put(ev[1]))
    futures = [
        client.submit(
            _rank_main,
            job,
            rank_fn,
            rank=r,
            world_size=world_size,
            master=master,
            topic=topic,
            workers=[w],
            allow_other_workers=False,
            pure=False,
            key=f"{topic}-rank{r}",
        )
        for r, w in enumerate(chosen)
    ]
    try:
        _watch(client, futures, chosen, events=events, on_event=on_event)
        results = client.gather(futures)
        _drain(events, on_event)
        return results
    finally:
        client.unsubscribe_topic(topic)
        client.cancel(futures)


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


def _watch(
    client: Client, futures: list, chosen: list[str], *, events: queue.Queue, on_event: OnEvent
) -> None:
    """Poll rather than gather: a failed or lost rank must end the attempt at once, while the
    other ranks would otherwise sit in a collective until the process-group timeout."""
    failed_at: float | None = None
    while not all(f.status == "finished" for f in futures):
        _drain(events, on_event)
        alive = set(worker_addresses(client))
        if gone := sorted(set(chosen) - alive):
            raise WorkerLost(gone, remaining=len(alive), group=len(chosen))
        errors = [(rank, f) for rank, f in enumerate(futures) if f.status in ("error", "cancelled")]
        if errors:
            # A rank whose peer died fails with a broken collective, sometimes before the
            # scheduler has noticed the dead worker: wait a little for that before blaming the rank.
            failed_at = failed_at or time.monotonic()
            text = " ".join(repr(f.exception()) for _, f in errors if f.status == "error")
            if not looks_like_lost_peer(text) or time.monotonic() - failed_at > LOSS_GRACE_S:
                rank, f = errors[0]
                exc = f.exception() if f.status == "error" else None
                raise TrainingError(
                    f"rank {rank} failed: {exc}" if exc else f"rank {rank} ended as {f.status}"
                ) from exc
        time.sleep(0.2)


def looks_like_lost_peer(error_text: str) -> bool:
    """True when an error looks like a broken connection to a peer that died (a collective, an
    actor on another worker), not the task's own bug."""
    text = error_text.lower()
    return any(
        s in text for s in ("connection", "gloo", "nccl", "timed out", "closed", "killedworker", "peer")
    )


def restart_workers(client: Client, *, at_least: int, hoped: int) -> None:
    """Kill and restart every worker (survivors are blocked in a collective), wait for the
    ``at_least`` that were alive, and a little longer for a replacement of the lost one (a nanny
    restarts a killed process; a cluster manager may add a worker): the run then keeps its world
    size and repeats exactly what an uninterrupted run would have done."""
    try:
        client.restart(timeout=180, wait_for_workers=False)
        client.wait_for_workers(max(1, at_least), timeout=180)
    except Exception as exc:  # distributed raises several types for workers that do not come back
        raise TrainingError(f"Dask workers did not come back after a worker was lost: {exc!r}") from exc
    with contextlib.suppress(TimeoutError):
        client.wait_for_workers(hoped, timeout=REPLACEMENT_WAIT_S)


def _ensure_fresh_workers(client: Client) -> None:
    """Back-to-back process groups in one worker process hang intermittently (design brief,
    section 2), so the workers are restarted before a job if any of them already hosted a rank.
    A fresh cluster (the embedded default, closed after training) never pays for a restart.

    Owners of a LocalCluster that runs several jobs must raise dask's
    ``distributed.deploy.lost-worker-timeout`` (infra.cluster does): otherwise a worker that takes
    longer than 15 s to come back from the restart has its nanny closed and never returns.
    """
    hosted = client.run(_hosted_a_rank)
    if any(hosted.values()):
        try:
            client.restart(timeout=180, wait_for_workers=False)
            client.wait_for_workers(len(hosted), timeout=180)
        except Exception as exc:  # distributed raises several types for workers that do not come back
            raise TrainingError(
                f"Dask workers did not come back from the restart before training: {exc!r}"
            ) from exc


def _hosted_a_rank(dask_worker: Any) -> bool:  # client.run passes the worker by this name
    return bool(getattr(dask_worker, "_mms_hosted_rank", False))


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


def _rank_main(
    job: TrainJob, rank_fn: RankFn, *, rank: int, world_size: int, master: str, topic: str
) -> RankResult:
    """Runs on a Dask worker: join the process group, run the rank, leave."""
    import torch
    import torch.distributed as dist

    worker = get_worker()
    worker._mms_hosted_rank = True  # read by _ensure_fresh_workers before the next job
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=job.train.timeout_s),
    )
    try:
        result = rank_fn(job, rank=rank, world_size=world_size, emit=lambda m: worker.log_event(topic, m))
        # Leave together: a rank tearing gloo down while its peer still talks to it can abort
        # ("terminate called without an active exception"), seen under torchrun in bench/.
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()
