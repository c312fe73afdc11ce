"""Fixtures shared by the training tests: the digits dataset sharded, and Dask clusters of
worker processes set up the way training strategies need them."""

import contextlib
import os
import signal
from collections.abc import Callable, Iterator

import dask
import pytest
from distributed import Client, LocalCluster

from mms_core import steps
from mms_core.data.ingest import DataSpec
from mms_core.data.shard import ShardSpec, preprocess_and_shard


@pytest.fixture(scope="session")
def digits_manifest(tmp_path_factory) -> Callable[[int], str]:
    """Factory: ``digits_manifest(n_shards)`` -> manifest URI of builtin digits in ``n_shards``
    training shards (made once per shard count per session; tests only read them)."""
    root = str(tmp_path_factory.mktemp("digits-shards"))
    made: dict[int, str] = {}

    def make(n_shards: int = 4) -> str:
        if n_shards not in made:
            raw = steps.ingest(spec=DataSpec(source="builtin://digits"), root=root)
            made[n_shards] = preprocess_and_shard(
                raw_uri=raw.uri,
                source_sha256=raw.sha256,
                label="label",
                spec=ShardSpec(n_shards=n_shards),
                root=root,
            )
        return made[n_shards]

    return make


@contextlib.contextmanager
def _training_cluster(n_workers: int) -> Iterator[Client]:
    # A worker killed by a test comes back through its nanny; the default lost-worker-timeout
    # (15 s) closes a nanny whose worker is slower than that to return under load, as
    # infra.cluster guards against too.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()


@pytest.fixture(scope="session")
def training_cluster() -> Callable[[int], contextlib.AbstractContextManager[Client]]:
    """Factory: ``with training_cluster(n) as client:`` a LocalCluster of n one-thread processes."""
    return _training_cluster


@pytest.fixture(scope="session")
def kill_worker() -> Callable[..., int]:
    """``kill_worker(client, index=-1)``: SIGKILL the worker process at ``index`` in address
    order (its nanny starts a new one) and return its pid: a worker lost mid-run."""

    def kill(client: Client, index: int = -1) -> int:
        pids = client.run(os.getpid)
        victim = pids[sorted(pids)[index]]
        os.kill(victim, signal.SIGKILL)
        return victim

    return kill
