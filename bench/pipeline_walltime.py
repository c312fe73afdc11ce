"""Where the wall time of `mms run` on digits goes, against the code before the embedded server.

    python -m bench.pipeline_walltime [--pairs 3] [--baseline-rev eef6847]

(a) The user's view: `mms run examples/digits.yaml` as a fresh process, in a fresh MMS_HOME and
then again in the same home (the second run of a day), for this tree ("ours") and for the
baseline revision (before issue 11: Prefect's temporary server in every process), exported with
`git archive` and run with the same virtual env (its modules first on PYTHONPATH). Ours and the
baseline alternate pair by pair; the headline is the median of the per-pair ratios with their range.
(b) The start-up pieces of ours, each alone: imports, the embedded Prefect server (new home,
existing home with the server stopped, attaching to a running one), MLflow's first store open.
(c) The flow in a warm process, as `mms run` calls it (embedded server, `Servers.running()`): per
task run times read back from the Prefect API, and the flow's wall time outside its tasks.

Prints JSON lines: one per run, then one per measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import date
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE_REV = "eef6847"  # main before issue 11


def emit(**fields: object) -> None:
    base = {
        "bench": "pipeline_walltime",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "date": str(date.today()),
    }
    print(json.dumps({**base, **fields}), flush=True)


def _clean_env(home: Path, tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMS_", "PREFECT_", "MLFLOW_"))}
    env["MMS_HOME"] = str(home)
    if tree != REPO:
        env["PYTHONPATH"] = str(tree)  # the baseline's modules before the editable install's
    return env


def time_cli_run(*, home: Path, tree: Path) -> float:
    """`mms run examples/digits.yaml` in a fresh process, as a user starts it from ``tree``."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("mms")), "run", "examples/digits.yaml"],
        cwd=tree, env=_clean_env(home, tree), check=True, capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    # Which code ran: the baseline's summary names Prefect's temporary server, ours the embedded one.
    expected = "embedded API" if tree == REPO else "temporary server"
    if expected not in proc.stdout:
        raise RuntimeError(f"`mms run` in {tree} did not run the expected code: {proc.stdout[-2000:]}")
    return seconds


def export_baseline(rev: str, into: Path) -> Path:
    """The tree of ``rev`` (tracked files only) under ``into``."""
    data = subprocess.run(["git", "archive", rev], cwd=REPO, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def cli_pairs(*, root: Path, baseline: Path, pairs: int) -> dict[str, list[float]]:
    """Alternate ours and the baseline: a fresh home, then a second run in the same home."""
    from infra.embedded_prefect import stop

    out: dict[str, list[float]] = {}
    for i in range(pairs):
        for name, tree in (("ours", REPO), ("baseline", baseline)):
            home = root / f"{name}-{i}"
            for when in ("fresh", "reused"):
                seconds = time_cli_run(home=home, tree=tree)
                out.setdefault(f"{name}_{when}", []).append(seconds)
                emit(run=f"{name}_{when}", pair=i, seconds=round(seconds, 2))
            stop(home=home)  # ours leaves the embedded server up for the next command; end it here
    return out


def startup_pieces(*, root: Path) -> dict[str, float]:
    """Each start-up cost of ours alone: imports, the embedded server, MLflow's first store open."""
    code = "import time; t=time.perf_counter(); import flows.training_pipeline; print(time.perf_counter()-t)"
    env = _clean_env(root / "imports", REPO)
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True)
    out = {"imports_s": float(run.stdout.decode().split()[-1])}
    from infra import embedded_prefect

    home = root / "server"
    for key in ("embedded_server_new_home_s", "embedded_server_existing_home_s", "embedded_server_attach_s"):
        t0 = time.perf_counter()
        lease = embedded_prefect.acquire(home=home, idle_s=60)
        lease.wait_ready(timeout_s=180)
        out[key] = time.perf_counter() - t0
        lease.release()
        if key != "embedded_server_existing_home_s":
            embedded_prefect.stop(home=home)  # the next start finds the database, not the server
    embedded_prefect.stop(home=home)
    from mms_core import registry

    t0 = time.perf_counter()
    registry.open_store(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    out["mlflow_store_open_new_s"] = time.perf_counter() - t0
    return out


def warm_flow(*, home: Path, runs: int = 2) -> tuple[float, dict[str, float]]:
    """The flow in this process as `mms run` calls it; the last of ``runs`` (the first imports)."""
    os.environ["MMS_HOME"] = str(home)
    from mms_cli.common import settings_from_env, use_servers

    settings = settings_from_env()
    servers = use_servers(settings)
    servers.ready(settings)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.training_pipeline import training_pipeline
    from mms_core.spec import load_spec

    # resume=false: a second run of the same spec would otherwise resume the first's final checkpoint
    # and train nothing
    spec = load_spec(REPO / "examples/digits.yaml", overrides=["training.resume=false"])
    for _ in range(runs):
        t0 = time.perf_counter()
        with servers.running():
            result = training_pipeline(spec=spec)
        wall = time.perf_counter() - t0
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[result.flow_run_id]))
        )
    tasks = {r.name.rsplit("-", 1)[0]: r.total_run_time.total_seconds() for r in task_runs}
    tasks["train_loop_only"] = result.train_seconds
    servers.lease.release()
    from prefect.logging.handlers import APILogWorker

    from infra.embedded_prefect import stop

    APILogWorker.drain_all(timeout=5)  # the run's last log lines go out before the server stops
    stop(home=home)
    return wall, tasks


def _ratio_summary(num: list[float], den: list[float]) -> dict[str, float]:
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="ours/baseline pairs of CLI runs")
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        baseline = export_baseline(args.baseline_rev, root / "baseline-tree")
        runs = cli_pairs(root=root, baseline=baseline, pairs=args.pairs)
        for key, values in runs.items():
            emit(measure=f"cli_{key}_s", value=round(statistics.median(values), 2), n=len(values))
        for when in ("fresh", "reused"):
            s = _ratio_summary(runs[f"ours_{when}"], runs[f"baseline_{when}"])
            emit(
                measure=f"cli_{when}_ours_over_baseline", value=round(s["median"], 3),
                min=round(s["min"], 3), max=round(s["max"], 3), baseline_rev=args.baseline_rev,
            )  # fmt: skip
        for key, value in startup_pieces(root=root / "pieces").items():
            emit(measure=key, value=round(value, 2))
        wall, tasks = warm_flow(home=root / "warm")
        emit(measure="flow_wall_warm_process_s", value=round(wall, 2))
        for name, seconds in tasks.items():
            emit(measure=f"task_{name}_s", value=round(seconds, 2))


if __name__ == "__main__":
    main()
