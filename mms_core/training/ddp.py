"""Synchronous data parallel (DDP) on a Dask cluster.

One rank per Dask worker, pinned with ``workers=[...]``; rank 0's worker hosts the TCP
rendezvous. Backend gloo on CPU, nccl on GPUs (dask-cuda gives each worker one device).
Metrics travel back as Dask worker events and are handed to ``on_event`` in the caller's
thread (so Prefect loggers and MLflow clients work there).
"""

from __future__ import annotations

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
from mms_core.training.loop import train_rank
from mms_core.training.spec import RankResult, TrainJob


def run_ddp(
    *,
    client: Client,
    job: TrainJob,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> list[RankResult]:
    """Train ``job`` with DDP across the cluster's workers; returns every rank's result (rank order).

    Args:
        client: a connected Dask client (built by the caller).
        job: the training job; ``job.train.world_size`` ranks (default: all workers).
        on_event: called in this thread with each metrics event from rank 0.

    Workers that already hosted a rank are restarted first. A caller that reuses one LocalCluster
    for several jobs must raise ``distributed.deploy.lost-worker-timeout`` (infra.cluster does).
    """
    _ensure_fresh_workers(client)
    workers = sorted(client.scheduler_info()["workers"])
    if not workers:
        raise TrainingError(
            "the Dask cluster has no workers; start some (mms stack up, MMS_N_WORKERS) and retry"
        )
    world_size = job.train.world_size or len(workers)
    if world_size > len(workers):
        raise TrainingError(f"training.world_size={world_size} but the cluster has {len(workers)} workers")
    chosen = workers[:world_size]
    port = client.submit(_free_port, workers=[chosen[0]], pure=False).result()
    master = f"{urlsplit(chosen[0]).hostname}:{port}"
    topic = f"mms-train-{uuid.uuid4().hex[:8]}"
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    client.subscribe_topic(topic, lambda ev: events.put(ev[1]))
    futures = [
        client.submit(
            _rank_main,
            job,
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
        # Poll rather than gather: a failed rank must fail the job at once, while the other
        # ranks would otherwise sit in an all-reduce until the collective timeout.
        while not all(f.done() for f in futures):
            _drain(events, on_event)
            for rank, f in enumerate(futures):
                if f.status == "error":
                    raise TrainingError(f"rank {rank} failed: {f.exception()}") from f.exception()
            time.sleep(0.2)
        for rank, f in enumerate(futures):
            if f.status != "finished":
                raise TrainingError(
                    f"rank {rank} ended as {f.status}: {f.exception() if f.status == 'error' else ''}"
                )
        results = client.gather(futures)
        _drain(events, on_event)
        return results
    finally:
        client.unsubscribe_topic(topic)
        client.cancel(futures)


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


def _drain(events: queue.Queue, on_event: Callable[[dict[str, Any]], None] | None) -> None:
    while True:
        try:
            ev = events.get_nowait()
        except queue.Empty:
            return
        if on_event:
            on_event(ev)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rank_main(job: TrainJob, *, rank: int, world_size: int, master: str, topic: str) -> RankResult:
    """Runs on a Dask worker: join the process group, train, leave."""
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
        result = train_rank(
            job=job, rank=rank, world_size=world_size, emit=lambda m: worker.log_event(topic, m)
        )
        # Leave together: a rank tearing gloo down while its peer still talks to it can abort
        # ("terminate called without an active exception"), seen under torchrun in bench/.
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()
