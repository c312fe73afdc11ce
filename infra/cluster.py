"""Build the Dask client the flows use, from settings: a scheduler address if one is set
(`mms stack up`, a cluster), else a LocalCluster (LocalCUDACluster when CUDA is present)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import dask
from distributed import Client, LocalCluster

from mms_core.config import Settings


@contextlib.contextmanager
def dask_client(settings: Settings) -> Iterator[Client]:
    """Yield a connected client; a cluster created here is closed on exit."""
    if settings.dask_address:
        with Client(settings.dask_address, timeout="30s") as client:
            yield client
        return
    # Training restarts workers between jobs; with the default 15 s, a LocalCluster hard-closes a
    # worker's nanny that is slow to come back (loaded machine) and the worker is lost for good.
    with (
        dask.config.set({"distributed.deploy.lost-worker-timeout": "10 minutes"}),
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
