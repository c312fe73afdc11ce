"""Build the Dask client the flows use, from settings: a scheduler address if one is set
(`mms stack up`, a cluster), else a LocalCluster (LocalCUDACluster when CUDA is present)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import dask
import yaml
from distributed import Client, LocalCluster

from mms_core.config import Settings

# Dask settings for clusters that run training: the LocalCluster below, and `mms stack up`'s
# workers through their DASK_CONFIG file (worker_config_yaml).
WORKER_DASK_CONFIG: dict = {
    "distributed": {
        "nanny": {
            # Dask sets MALLOC_TRIM_THRESHOLD_=65536 in workers; any value turns off glibc's adaptive
            # mmap threshold, so every per-step buffer >= 128 KiB is a fresh mmap + page faults:
            # ~3x the page faults and ~24% fewer samples/s than torchrun (bench/RESULTS.md).
            "pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": None},
        },
        # Training restarts workers between jobs; with the default 15 s, a LocalCluster hard-closes
        # the nanny of a worker that is slow to come back (loaded machine): the worker is lost.
        "deploy": {"lost-worker-timeout": "10 minutes"},
    }
}


def worker_config_yaml() -> str:
    """WORKER_DASK_CONFIG as YAML, for the DASK_CONFIG of `dask worker` processes."""
    return yaml.safe_dump(WORKER_DASK_CONFIG)


def _dotted(tree: dict, prefix: str = "") -> dict[str, object]:
    """dask.config.set replaces whole subtrees given nested dicts; hand it dotted leaf keys."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@contextlib.contextmanager
def dask_client(settings: Settings) -> Iterator[Client]:
    """Yield a connected client; a cluster created here is closed on exit."""
    if settings.dask_address:
        with Client(settings.dask_address, timeout="30s") as client:
            yield client
        return
    with (
        dask.config.set(_dotted(WORKER_DASK_CONFIG)),
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
