"""Build the Dask client the flows use, from settings: a scheduler address if one is set
(`mms stack up`, a cluster), else a LocalCluster (LocalCUDACluster when CUDA is present)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import dask
from distributed import Client, LocalCluster

from infra.dask_config import WORKER_DASK_CONFIG, WORKER_UNSET_ENV, dotted
from mms_core.config import Settings


@contextlib.contextmanager
def dask_client(settings: Settings) -> Iterator[Client]:
    """Yield a connected client; a cluster created here is closed on exit."""
    if settings.dask_address:
        with Client(settings.dask_address, timeout="30s") as client:
            yield client
        return
    with (
        dask.config.set(dotted(WORKER_DASK_CONFIG)),
        _without_env(WORKER_UNSET_ENV),
        _local_cluster(settings) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _local_cluster(settings: Settings) -> LocalCluster:
    try:
        import torch

        if torch.cuda.is_available():
            from dask_cuda import LocalCUDACluster  # optional [gpu] extra

            return LocalCUDACluster(
                ip="127.0.0.1", dashboard_address=None, threads_per_worker=settings.threads_per_worker
            )
    except ImportError:
        pass
    return LocalCluster(
        n_workers=settings.n_workers,
        threads_per_worker=settings.threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        memory_limit=settings.worker_memory,
    )


@contextlib.contextmanager
def _without_env(names: tuple[str, ...]) -> Iterator[None]:
    """Hide ``names`` from os.environ while the cluster lives: its nannies spawn (and re-spawn, on
    restarts) workers from this process's environment, which an earlier Dask cluster in the same
    process may have filled with its own pre-spawn settings."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
