"""The cluster the flows build: training-friendly Dask settings reach the worker processes."""

import json
import os
import subprocess
import sys

import dask
import yaml

from infra.cluster import dask_client
from infra.dask_config import WORKER_DASK_CONFIG, worker_config_yaml
from mms_core.config import Settings


def _trim(dask_worker=None) -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def _diagnostic_intervals(dask_worker) -> tuple[float, float]:
    callbacks = dask_worker.periodic_callbacks
    return callbacks["profile"].callback_time, callbacks["tick"].callback_time


def _tick_interval(dask_scheduler) -> float:
    return dask_scheduler.periodic_callbacks["tick"].callback_time


def test_local_cluster_workers_start_without_malloc_trim_threshold(tmp_path, monkeypatch):
    # As if an earlier plain Dask cluster had run here: the nanny writes Dask's pre-spawn
    # environment into its host process, and spawned workers inherit the host's environment.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with dask_client(Settings(home=tmp_path, n_workers=2, dask_address=None)) as client:
        assert set(client.run(_trim).values()) == {None}
        assert set(client.run(lambda: os.environ.get("OMP_NUM_THREADS")).values()) == {"1"}  # others kept
        # Dask's diagnostics wake less often in every process: workers' profiler and event-loop
        # check, and the scheduler's (callback_time in ms, as the processes run them).
        assert set(client.run(_diagnostic_intervals).values()) == {(100, 200)}
        assert client.run_on_scheduler(_tick_interval) == 200
        assert dask.config.get("distributed.deploy.lost-worker-timeout") == "10 minutes"
    assert dask.config.get("distributed.deploy.lost-worker-timeout") == "15s"  # scoped to the cluster
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # the host's environment is given back


def test_worker_config_yaml_reaches_a_process_that_loads_it_as_dask_config(tmp_path):
    """What `dask worker` does with DASK_CONFIG=<file>: Dask's defaults merged with ours."""
    path = tmp_path / "dask-worker.yaml"
    path.write_text(worker_config_yaml())
    assert yaml.safe_load(path.read_text()) == WORKER_DASK_CONFIG
    probe = (
        "import dask, json; from distributed.nanny import _get_env_variables; "
        "print(json.dumps([_get_env_variables('distributed.nanny.pre-spawn-environ'), "
        "dask.config.get('distributed.deploy.lost-worker-timeout'), "
        "dask.config.get('distributed.worker.profile.interval'), "
        "dask.config.get('distributed.admin.tick.interval')]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"} | {"DASK_CONFIG": str(path)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    spawn_env, timeout, profile, tick = json.loads(out.stdout)
    assert "MALLOC_TRIM_THRESHOLD_" not in spawn_env and spawn_env["OMP_NUM_THREADS"] == "1"
    assert (timeout, profile, tick) == ("10 minutes", "100ms", "200ms")
