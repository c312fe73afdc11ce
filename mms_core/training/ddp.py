"""Synchronous data parallel (DDP) on a Dask cluster.

One rank per Dask worker (launch.py); every rank holds the whole model and DDP all-reduces the
gradients (gloo on CPU, nccl on GPUs: dask-cuda gives each worker one device). Metrics travel
back as Dask worker events and are handed to ``on_event`` in the caller's thread (so Prefect
loggers and MLflow clients work there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distributed import Client

from mms_core.training.launch import run_process_group
from mms_core.training.loop import Replicated, train_rank
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
        on_event: called in this thread with each event from rank 0 (epoch metrics, progress,
            resume and restart notices).

    Each rank runs in a process of its own on its worker (launch.py): the workers, and whatever
    else they host, are never restarted.
    """
    return run_process_group(client=client, job=job, rank_fn=ddp_rank, on_event=on_event)


def ddp_rank(job: TrainJob, *, rank: int, world_size: int, emit: Callable | None = None) -> RankResult:
    """One DDP rank (runs inside the process group)."""
    return train_rank(job=job, rank=rank, world_size=world_size, emit=emit, parallel=Replicated())
