"""DDP overhead: the same training loop on the same shards, launched by our Dask path and by torchrun.

    python -m bench.ddp_overhead [--epochs N] [--reps R] [--dask-malloc-trim dask-default]

(a) ``dask``: :func:`mms_core.training.ddp.run_ddp` on the cluster the flow uses,
:func:`infra.cluster.dask_client` (a fresh LocalCluster of 2 processes, one thread each);
(b) ``torchrun``: ``python -m torch.distributed.run --standalone --nproc_per_node 2
bench/_torchrun_rank.py``. Both run
:func:`mms_core.training.loop.train_rank` with one ``TrainJob`` (num_threads=1,
checkpoint_every=0) on one shard manifest. Each rep runs both paths back to back, in turn
first (AB BA AB ...: a steady drift of the box's speed cancels within two reps), and each run
prints one JSON line; then one median line per path and a final line with the ratio
ours/torchrun.

samples_per_s is the training-loop throughput from rank 0's RankResult,
``steps * batch_size * world_size / train_seconds``; wall_s is the end-to-end time of the path
(cluster or process start, data load, training, teardown), a separate cost.

Environment: Dask's nanny sets ``distributed.nanny.pre-spawn-environ`` (OMP_NUM_THREADS=1,
MALLOC_TRIM_THRESHOLD_=65536, ...) in the worker processes *and* in the process hosting the
nanny (here, this one). torchrun ranks therefore get the environment captured when this module
was imported, plus OMP_NUM_THREADS=1, so the run order cannot leak Dask's settings into them.
infra.cluster drops Dask's MALLOC_TRIM_THRESHOLD_=65536 from the workers; ``--dask-malloc-trim
dask-default`` puts it back, to show what it costs (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mms_core.data.ingest import DataSpec, load_source, snapshot
from mms_core.data.shard import ShardSpec, preprocess_and_shard
from mms_core.models import ModelSpec
from mms_core.training.spec import RankResult, TrainJob, TrainSpec

BENCH = "ddp_overhead"
WORLD_SIZE = 2
SOURCE = "builtin://synthetic?n_samples=20000&n_features=64&n_classes=10"
RANK_SCRIPT = Path(__file__).with_name("_torchrun_rank.py")
BASE_ENV = dict(os.environ)  # before any Nanny writes its pre-spawn-environ into os.environ


def machine() -> str:
    """Platform string plus the number of CPUs this process may use."""
    return f"{platform.platform()} nproc={len(os.sched_getaffinity(0))}"


def prepare_data(*, root: str) -> str:
    """Snapshot the synthetic data set and shard it (4 shards) under ``root``; returns the manifest URI."""
    spec = DataSpec(source=SOURCE)
    ingest = snapshot(df=load_source(spec=spec), label=spec.label, root=root)
    return preprocess_and_shard(
        raw_uri=ingest.uri,
        source_sha256=ingest.sha256,
        label=spec.label,
        spec=ShardSpec(n_shards=4),
        root=root,
    )


def make_job(*, manifest_uri: str, workdir: Path, epochs: int, batch_size: int) -> TrainJob:
    """The single job both launchers run: MLP 256x256, one thread per rank, no step checkpoints."""
    return TrainJob(
        manifest_uri=manifest_uri,
        model=ModelSpec(name="mlp", kwargs={"hidden": [256, 256]}),
        # resume=False: every rep shares checkpoint_uri, and the loop always writes an epoch-end
        # checkpoint, so a resuming rep would find the previous rep's last one and train nothing.
        train=TrainSpec(
            epochs=epochs, batch_size=batch_size, checkpoint_every=0, resume=False, world_size=WORLD_SIZE
        ),
        output_uri=str(workdir / "model.safetensors"),
        checkpoint_uri=str(workdir / "checkpoints"),
        num_threads=1,
    )


def run_dask(*, job: TrainJob, dask_default_trim: bool = False) -> tuple[RankResult, float, str | None]:
    """Train ``job`` through ``run_ddp`` on the flow's cluster (infra.cluster.dask_client).

    Args:
        job: the training job.
        dask_default_trim: put back Dask's MALLOC_TRIM_THRESHOLD_=65536, which infra.cluster drops.

    Returns:
        (rank 0 result, wall seconds, the workers' MALLOC_TRIM_THRESHOLD_ or None). The wall time
        covers cluster start, training and cluster close; the workers are fresh, so ``run_ddp``
        pays no worker restart here.
    """
    from infra.cluster import dask_client
    from mms_core.config import Settings
    from mms_core.training.ddp import run_ddp

    settings = Settings(n_workers=WORLD_SIZE, threads_per_worker=1, dask_address=None)
    t0 = time.perf_counter()
    with _plain_dask_client() if dask_default_trim else dask_client(settings) as client:
        results = run_ddp(client=client, job=job)
        trim = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    wall = time.perf_counter() - t0
    return results[0], wall, next(iter(trim.values()))


@contextlib.contextmanager
def _plain_dask_client() -> Iterator[Any]:
    """A LocalCluster with Dask's own defaults (MALLOC_TRIM_THRESHOLD_=65536 in the workers)."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=WORLD_SIZE, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def torchrun_env() -> dict[str, str]:
    """Environment of the torchrun ranks: this process's at import time, plus OMP_NUM_THREADS=1."""
    return {**BASE_ENV, "OMP_NUM_THREADS": "1"}


def run_torchrun(*, job: TrainJob, workdir: Path) -> tuple[RankResult, float, str | None]:
    """Train ``job`` with ``torchrun --standalone --nproc_per_node 2``.

    Returns:
        (rank 0 result, wall seconds, the ranks' MALLOC_TRIM_THRESHOLD_ or None). The wall time
        covers the launcher and rank processes from start to exit.
    """
    job_path, out_path = workdir / "job.json", workdir / "rank0.json"
    job_path.write_text(job.model_dump_json())
    out_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(WORLD_SIZE),
        str(RANK_SCRIPT),
        "--job",
        str(job_path),
        "--out",
        str(out_path),
    ]
    env = torchrun_env()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"torchrun failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return RankResult.model_validate_json(out_path.read_text()), wall, env.get("MALLOC_TRIM_THRESHOLD_")


def samples_per_s(*, result: RankResult, batch_size: int) -> float:
    """Training-loop throughput over all ranks: steps * batch_size * world_size / train_seconds."""
    if result.train_seconds <= 0:  # e.g. a run that resumed a finished checkpoint: it measured nothing
        raise RuntimeError(f"run trained for {result.train_seconds} s: nothing measured")
    return result.steps * batch_size * WORLD_SIZE / result.train_seconds


def record(
    *,
    path: str,
    rep: int,
    result: RankResult,
    wall_s: float,
    malloc_trim: str | None,
    job: TrainJob,
    stamp: dict[str, str],
) -> dict:
    """One measurement as a JSON-ready dict."""
    return {
        "bench": BENCH,
        "path": path,
        "rep": rep,
        "samples_per_s": round(samples_per_s(result=result, batch_size=job.train.batch_size), 1),
        "train_s": round(result.train_seconds, 3),
        "wall_s": round(wall_s, 3),
        "steps": result.steps,
        "epochs": job.train.epochs,
        "batch_size": job.train.batch_size,
        "world_size": WORLD_SIZE,
        "epoch_samples_per_s_median": round(statistics.median(m.samples_per_s for m in result.history), 1),
        "final_val_accuracy": round(result.history[-1].val_accuracy, 4) if result.history else None,
        "params_sha256": result.params_sha256[:16],
        "malloc_trim_threshold": malloc_trim,
        **stamp,
    }


def median_record(*, path: str, rows: list[dict], stamp: dict[str, str]) -> dict:
    """Median of one path's measurements."""
    return {
        "bench": BENCH,
        "path": path,
        "stat": "median",
        "n": len(rows),
        "samples_per_s": round(statistics.median(r["samples_per_s"] for r in rows), 1),
        "train_s": round(statistics.median(r["train_s"] for r in rows), 3),
        "wall_s": round(statistics.median(r["wall_s"] for r in rows), 3),
        **stamp,
    }


def ratio_record(
    *, ours: dict, ref: dict, pairs: list[tuple[dict, dict]], rows: list[dict], stamp: dict[str, str]
) -> dict:
    """Final line: ours/torchrun (goal >= 0.95) as the median of the per-rep ratios, with both medians.

    Each rep runs the two paths back to back (which goes first alternates), so a rep's ratio sees
    the same background load on both sides; on a shared box whose speed drifts by +-15% between
    minutes, the median of those ratios is steadier than the ratio of the two medians (also
    recorded, ``ratio_of_medians``).
    """
    per_rep = [d["samples_per_s"] / t["samples_per_s"] for d, t in pairs]
    ratio = statistics.median(per_rep)
    return {
        "bench": BENCH,
        "path": "dask/torchrun",
        "ratio": round(ratio, 3),
        "rep_ratios": [round(r, 3) for r in per_rep],
        "ratio_of_medians": round(ours["samples_per_s"] / ref["samples_per_s"], 3),
        "goal": 0.95,
        "meets_goal": ratio >= 0.95,
        "samples_per_s": {"dask": ours["samples_per_s"], "torchrun": ref["samples_per_s"]},
        "wall_s": {"dask": ours["wall_s"], "torchrun": ref["wall_s"]},
        "same_params": len({r["params_sha256"] for r in rows}) == 1,
        **stamp,
    }


def run_bench(
    *,
    epochs: int,
    batch_size: int,
    reps: int,
    dask_default_trim: bool = False,
    emit: Callable[[dict[str, Any]], None],
) -> dict:
    """Prepare data once, run both paths `reps` times (AB BA ...), emit each line; return the ratio."""
    stamp = {"machine": machine(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory(prefix="mms-bench-ddp-") as tmp:
        workdir = Path(tmp)
        job = make_job(
            manifest_uri=prepare_data(root=str(workdir / "data")),
            workdir=workdir,
            epochs=epochs,
            batch_size=batch_size,
        )
        rows: dict[str, list[dict]] = {"dask": [], "torchrun": []}
        for rep in range(1, reps + 1):
            for path in ("dask", "torchrun") if rep % 2 else ("torchrun", "dask"):
                if path == "dask":
                    result, wall, trim = run_dask(job=job, dask_default_trim=dask_default_trim)
                else:
                    result, wall, trim = run_torchrun(job=job, workdir=workdir)
                row = record(
                    path=path, rep=rep, result=result, wall_s=wall, malloc_trim=trim, job=job, stamp=stamp
                )
                rows[path].append(row)
                emit(row)
    medians = {path: median_record(path=path, rows=rs, stamp=stamp) for path, rs in rows.items()}
    for m in medians.values():
        emit(m)
    final = ratio_record(
        ours=medians["dask"],
        ref=medians["torchrun"],
        pairs=list(zip(rows["dask"], rows["torchrun"], strict=True)),
        rows=[*rows["dask"], *rows["torchrun"]],
        stamp=stamp,
    )
    emit(final)
    return final


def print_line(obj: dict[str, Any]) -> None:
    """Print one JSON line and flush (so progress shows while the next run trains)."""
    print(json.dumps(obj), flush=True)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="DDP overhead: Dask path vs torchrun, same loop and shards.")
    parser.add_argument("--epochs", type=int, default=8, help="Epochs per run (default: %(default)s).")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="Rows per step per rank (default: %(default)s)."
    )
    parser.add_argument(
        "--reps", type=int, default=6, help="Runs of each path, alternating (default: %(default)s)."
    )
    parser.add_argument(
        "--dask-malloc-trim",
        choices=["mms", "dask-default"],
        default="mms",
        help="'dask-default' keeps Dask's MALLOC_TRIM_THRESHOLD_=65536 in the workers, which MMS drops "
        "(diagnostic; default: the flow's cluster, as deployed).",
    )
    args = parser.parse_args(argv)
    run_bench(
        epochs=args.epochs,
        batch_size=args.batch_size,
        reps=args.reps,
        dask_default_trim=args.dask_malloc_trim == "dask-default",
        emit=print_line,
    )


if __name__ == "__main__":
    main()
