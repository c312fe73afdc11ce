"""Build the Dask client the flows use, from settings: a scheduler address if one is set
(`mms stack up`, a cluster), else a LocalCluster (LocalCUDACluster when CUDA is present)."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future

import dask
from distributed import Client, LocalCluster

from infra.dask_config import WORKER_DASK_CONFIG, WORKER_UNSET_ENV, dotted
from mms_core.config import Settings

log = logging.getLogger(__name__)


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


@contextlib.contextmanager
def dask_scheduler(settings: Settings) -> Iterator[str]:
    """Yield the scheduler's address, with no client of our own: for a process whose Dask client is
    someone else's (the online server's runtime opens its own asynchronous one). A LocalCluster
    created here is closed on exit."""
    if settings.dask_address:
        yield settings.dask_address
        return
    with (
        dask.config.set(dotted(WORKER_DASK_CONFIG)),
        _without_env(WORKER_UNSET_ENV),
        _local_cluster(settings) as cluster,
    ):
        yield cluster.scheduler_address


def _local_cluster(settings: Settings) -> LocalCluster:
    # This process hosts the LocalCluster's scheduler and nannies, which log every start, worker
    # registration and close at INFO. silence_logs only re-levels handlers on the "distributed"
    # logger and there are none: Prefect gave the root logger its console handler before distributed
    # was imported, so distributed added none and its records reach Prefect's console (`mms run`).
    logging.getLogger("distributed").setLevel(logging.WARNING)
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


# Modules the training tasks import on the workers (fedavg clients, parameter-server actors, the
# supervisor of a rank's process): importing them while the flow ingests and shards takes ~1.5 s
# (torch) off the training task. A rank's own process imports torch again, from a warm page cache.
WARM_MODULES = ("torch", "torch.distributed", "mms_core.training.loop", "mms_core.training.launch")


class ClusterInBackground:
    """A Dask client whose cluster starts (and workers warm up) on a thread while the flow does
    other work, and closes on that thread while the flow goes on; see :func:`dask_client_in_background`."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._ready: Future[Client] = Future()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._own, name="mms-dask-cluster", daemon=True)
        self._thread.start()

    def _own(self) -> None:
        try:
            with dask_client(self._settings) as client:
                _warm_up(client)
                self._ready.set_result(client)
                self._release.wait()
        except BaseException as exc:  # handed to whoever asks for the client
            if not self._ready.done():
                self._ready.set_exception(exc)
            else:
                log.warning("closing the Dask cluster failed: %r", exc)

    def client(self, timeout_s: float | None = None) -> Client:
        """The connected client, once the cluster is up and warm; raises what its start raised."""
        return self._ready.result(timeout=timeout_s)

    def close_soon(self) -> None:
        """Start closing the cluster (on the thread) and return at once; idempotent."""
        self._release.set()

    def close(self) -> None:
        """Close the cluster and wait until it is closed."""
        self._release.set()
        self._thread.join()


@contextlib.contextmanager
def dask_client_in_background(settings: Settings) -> Iterator[ClusterInBackground]:
    """Like :func:`dask_client`, but the cluster starts at once on a thread: ``.client()`` waits for
    it, ``.close_soon()`` lets it close while the caller goes on, and leaving the block waits for the
    close. The LocalCluster's start (~0.6 s on 2 cores), the workers' imports (~1.5 s) and its close
    (~1 s after training) then overlap the flow's other steps instead of adding to them."""
    cluster = ClusterInBackground(settings)
    try:
        yield cluster
    finally:
        cluster.close()


def _warm_up(client: Client) -> None:
    def load() -> None:
        for name in WARM_MODULES:
            importlib.import_module(name)

    try:
        client.run(load)
    except Exception as exc:  # an optimisation only: training imports them anyway
        log.info("warming up the workers failed: %r", exc)
