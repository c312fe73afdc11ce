"""Where the wall time of `mms run` on digits goes: Prefect / MLflow / Dask start-up vs real work.

    python -m bench.pipeline_walltime

Prints JSON lines: the whole `mms run` as a user runs it (subprocess, fresh MMS_HOME), then the
start-up pieces measured on their own, then the pipeline's tasks (durations read back from the
Prefect API) in a warm process.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def emit(**fields: object) -> None:
    base = {
        "bench": "pipeline_walltime",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "date": str(date.today()),
    }
    print(json.dumps({**base, **fields}), flush=True)


def time_cli_run(*, home: Path) -> float:
    """The user's view: `mms run examples/digits.yaml` in a fresh process and MMS_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMS_", "PREFECT_"))}
    env["MMS_HOME"] = str(home)
    t0 = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).with_name("mms")), "run", "examples/digits.yaml"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - t0


def time_startup_pieces(*, home: Path) -> dict[str, float]:
    """Each start-up cost alone, in this process: imports, Prefect temp server, MLflow DB, Dask cluster."""
    os.environ["MMS_HOME"] = str(home)
    from mms_core.config import Settings, prefect_env

    os.environ.update(prefect_env(Settings()))
    t0 = time.perf_counter()
    import distributed  # noqa: F401
    import mlflow  # noqa: F401
    import prefect
    import torch  # noqa: F401

    import flows.training_pipeline  # noqa: F401

    out = {"imports_s": time.perf_counter() - t0}

    @prefect.flow
    def empty() -> None:
        return None

    t0 = time.perf_counter()
    empty()  # starts the temporary server
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    empty()
    out["prefect_temp_server_s"] = first - (time.perf_counter() - t0)

    from mms_core import registry

    settings = Settings()
    t0 = time.perf_counter()
    exp = registry.ensure_experiment(
        tracking_uri=settings.tracking_uri, name="bench", artifact_root=settings.artifact_root
    )
    registry.start_run(
        tracking_uri=settings.tracking_uri, experiment_id=exp, run_name="bench", tags={}, params={}
    )
    out["mlflow_db_and_run_s"] = time.perf_counter() - t0

    from infra.cluster import dask_client

    t0 = time.perf_counter()
    with dask_client(settings) as client:
        client.wait_for_workers(settings.n_workers)
        out["dask_cluster_start_s"] = time.perf_counter() - t0
    return out


def time_tasks(*, home: Path) -> tuple[float, dict[str, float]]:
    """Run the flow in this (warm) process; per-task run times from the Prefect API."""
    os.environ["MMS_HOME"] = str(home)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.training_pipeline import training_pipeline
    from mms_core.spec import load_spec

    t0 = time.perf_counter()
    result = training_pipeline(spec=load_spec(REPO / "examples/digits.yaml"))
    wall = time.perf_counter() - t0
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[result.flow_run_id]))
        )
    tasks = {r.name.rsplit("-", 1)[0]: r.total_run_time.total_seconds() for r in runs}
    tasks["train_loop_only"] = result.train_seconds
    return wall, tasks


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        emit(measure="mms_run_cli_wall_s", value=round(time_cli_run(home=root / "cli"), 2))
        for key, value in time_startup_pieces(home=root / "pieces").items():
            emit(measure=key, value=round(value, 2))
        wall, tasks = time_tasks(home=root / "warm")
        emit(measure="flow_wall_warm_process_s", value=round(wall, 2))
        for name, seconds in tasks.items():
            emit(measure=f"task_{name}_s", value=round(seconds, 2))


if __name__ == "__main__":
    main()
