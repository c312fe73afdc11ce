"""The training pipeline on a cluster it did not start, reached by settings only.

A `dask scheduler` and two nanny-managed `dask worker` processes run on 127.0.0.1 as separate
processes (what a cluster gives: compose, dask-kubernetes, dask-jobqueue), with the Dask config
file the container image ships (infra/docker/dask-worker.yaml). `mms run` reaches them through
MMS_DASK_ADDRESS alone. A small DDP job runs on the workers first, so the pipeline's training is
a second job on the same worker processes: its ranks run in processes of their own, and the
workers, which others may share, are never restarted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client
from mlflow import MlflowClient

from mms_core import steps
from mms_core.data.ingest import DataSpec
from mms_core.data.shard import ShardSpec, preprocess_and_shard
from mms_core.models import ModelSpec
from mms_core.training.ddp import run_ddp
from mms_core.training.spec import TrainJob, TrainSpec

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORKER_CONFIG = REPO / "infra" / "docker" / "dask-worker.yaml"
MODEL = "digits-external"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMS_", "PREFECT_", "DASK_"))}
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started (nanny + worker), SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    # The group may outlive its leader (a worker process still exiting).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def external_cluster(tmp_path: Path) -> Iterator[str]:
    """Scheduler + 2 workers as separate processes; yields the scheduler address."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path / "cluster-logs"
    logs.mkdir()
    env = _clean_env(MMS_HOME=str(tmp_path), DASK_CONFIG=str(WORKER_CONFIG))
    commands = {
        "scheduler": [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                      "--no-dashboard"],
        **{
            f"worker-{i}": [
                str(BIN / "dask"), "worker", address, "--name", f"ext-{i}", "--nworkers", "1",
                "--nthreads", "1", "--memory-limit", "2GiB", "--no-dashboard", "--host", "127.0.0.1",
                "--local-directory", str(tmp_path / "dask-worker-space"),
            ]
            for i in range(2)
        },
    }  # fmt: skip
    procs: list[subprocess.Popen] = []
    try:
        for name, command in commands.items():
            with open(logs / f"{name}.log", "wb") as out:
                procs.append(
                    subprocess.Popen(
                        command,
                        cwd=REPO,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )  # fmt: skip
                )
            if name == "scheduler":
                time.sleep(0.5)
        with Client(address, timeout="60s", set_as_default=False) as client:
            client.wait_for_workers(2, timeout=90)
        yield address
    finally:
        for proc in reversed(procs):  # workers before their scheduler
            _stop(proc)


def _pids(client: Client) -> dict[str, int]:
    """Worker name -> process id (a restarted worker keeps its name, not its port)."""
    return dict(client.run(lambda dask_worker: (dask_worker.name, os.getpid())).values())


def _first_job(client: Client, root: Path) -> None:
    """A one-epoch DDP job straight on the external workers (no Prefect)."""
    raw = steps.ingest(spec=DataSpec(source="builtin://digits"), root=str(root))
    manifest = preprocess_and_shard(
        raw_uri=raw.uri, source_sha256=raw.sha256, label="label", spec=ShardSpec(n_shards=2), root=str(root)
    )
    job = TrainJob(
        manifest_uri=manifest,
        model=ModelSpec(name="mlp"),
        train=TrainSpec(epochs=1, batch_size=64, checkpoint_every=1000),
        output_uri=str(root / "first" / "weights.safetensors"),
        checkpoint_uri=str(root / "first" / "ckpt"),
    )
    results = run_ddp(client=client, job=job)
    assert len(results) == 2


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_mms_run_trains_on_an_external_scheduler_and_workers(external_cluster: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    with Client(external_cluster, timeout="30s", set_as_default=False) as client:
        _first_job(client, tmp_path / "first-job")
        before = _pids(client)
        assert len(before) == 2

    env = _clean_env(MMS_HOME=str(home), MMS_DASK_ADDRESS=external_cluster, COLUMNS="200")
    overrides = [
        "training.epochs=2", "evaluate.min_accuracy=0.5", f"registry.model_name={MODEL}",
        "registry.experiment=external-cluster", "compress.quantize=false", "compress.prune_amount=0",
    ]  # fmt: skip
    args = [str(BIN / "mms"), "run", "examples/digits.yaml", *(x for o in overrides for x in ("--set", o))]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{MODEL} v1 -> @champion" in proc.stdout

    with Client(external_cluster, timeout="30s", set_as_default=False) as client:
        after = _pids(client)
        # The same two worker processes: the pipeline's ranks ran in processes of their own.
        assert after == before and sorted(after) == ["ext-0", "ext-1"]

    # No LocalCluster was built: the embedded default would have left no trace on these workers,
    # and the run was tracked in the default MLflow store under MMS_HOME.
    registry = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    champion = registry.get_model_version_by_alias(MODEL, "champion")
    run = registry.get_run(champion.tags["mms.run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in registry.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert float(champion.tags["mms.test_accuracy"]) >= 0.5
