"""Fixtures shared by the core tests: the digits dataset sharded, Dask clusters of worker
processes set up the way training strategies need them, a user model module, and MLflow's global
tracking URI pointed at a test's store."""

import contextlib
import os
import signal
import sys
import textwrap
import uuid
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


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a module with a few builders to tmp_path and put it on sys.path; returns its (unique) name."""
    name = f"mms_user_model_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def build(*, in_features, n_classes, width=12):
                return nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, n_classes))

            def not_a_module(*, in_features, n_classes):
                return {"in": in_features, "out": n_classes}

            def strict(*, in_features, n_classes):
                return nn.Linear(in_features, n_classes)

            NOT_CALLABLE = 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[str]:
    import mlflow  # here: most core tests never touch MLflow, and importing it takes a second or two
    from mlflow.tracking._tracking_service import utils as tracking_utils

    prev_uri, prev_env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(prev_uri)
        if prev_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = prev_env


@pytest.fixture(scope="session")
def global_tracking_uri() -> Callable[[str], contextlib.AbstractContextManager[str]]:
    """``with global_tracking_uri(uri):`` MLflow's global tracking URI (which ``models:/`` URIs
    resolve through) is ``uri`` inside; runs left active are ended and the previous URI is put back."""
    return _global_tracking_uri
