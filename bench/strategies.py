"""Training throughput of the process-group and parameter-server strategies, 1 and 2 workers.

    python -m bench.strategies [--epochs 4] [--reps 2] [--batch-size 64] [--only ddp,fsdp,...]
                               [--tag T] [--plot-only]

Every run trains one job on the synthetic workload of ``bench.ddp_overhead`` (20000x64, 10
classes, 4 shards; MLP 256x256; ``num_threads=1``, ``checkpoint_every=0``, ``resume=false``)
through :func:`mms_core.training.strategies.run_strategy`, on a fresh cluster from
:func:`infra.cluster.dask_client` (LocalCluster of 1 or 2 processes, one thread each, on
127.0.0.1), so no strategy pays a worker restart. Configurations:

- ``ddp``; ``hierarchical`` with ``group_size=1``: at 2 workers, 2 groups of one rank, so the
  hook's in-group reduce and broadcast have nothing to do and only the supernode all-reduce runs
  (the same 2-rank ring as DDP's, inside the comm hook, synchronously). Both levels at once need
  4+ ranks; ``group_size=None`` on one host would give the other half (one group: reduce +
  broadcast, no supernode all-reduce);
- ``param_server`` with ``staleness_bound=None`` (async) and ``param_server_s0`` with
  ``staleness_bound=0`` (synchronous SGD through the actors), one shard;
- ``fsdp`` (FSDP2). At 1 worker nothing is split: ddp and hierarchical train the bare model
  (no DDP wrapper), fsdp still applies ``fully_shard`` over a 1-rank group (the launcher always
  initialises one), so every parameter is a 1-way DTensor (``local_params == total_params``)
  and the run shows FSDP's bookkeeping with no sharding; param_server still goes through the
  actor for every step.

Throughput, one definition for all: ``samples_per_s = samples / train_s``, where ``samples`` is
rank 0's ``RankResult.samples`` (rows trained, summed over ranks and epochs: the loop
all-reduces its counts, param_server sums the ranks' epoch reports) and ``train_s`` the largest
``train_seconds`` over the ranks (ranks of a process group end together; async param_server
ranks need not). What ``train_seconds`` covers differs by design: for ddp/hierarchical/fsdp the
rank loop including the per-epoch validation (rank 0; every rank under fsdp) and the end-of-epoch
checkpoint (safetensors on rank 0; DCP shards + sha256 under fsdp); for param_server the worker
task from the start (reading its shards, building the model, first pull) to its last push, with
the driver's evaluation and checkpoints running meanwhile in this process. ``epoch_samples_per_s``
is the median of ``history[].samples_per_s`` over epochs 2.. (epoch 1 is warm-up): training steps
only for the loop strategies, time between epoch-end snapshots for param_server. ``wall_s``: cluster
start, worker imports, training, cluster close. Before the job every worker imports torch and
the strategies (``client.run``): a param_server rank starts its clock when its task starts, so
on cold workers a rank that waits for a peer still importing torch (~2 s here; staleness_bound=0
makes it wait) would count that wait as training time.

Other jobs on the box skew the 2-worker runs most: each run line has ``own_cpu_s`` (CPU seconds
of this process and the cluster's during training) and ``other_cpu_s`` (the rest of the
machine's busy CPU meanwhile; near 0 on a quiet box), and the start and end lines the load
average.

Runs alternate (configs in order, then reversed) and print one JSON line each; then one summary
line per (strategy, world size): medians, ``vs_ddp`` (ratio to ddp at that world size) and
``scaling`` (2 workers / 1 worker). All lines also go to bench/data/strategies.jsonl
(overwritten; ``--tag T``: strategies-T.jsonl); the plot to bench/strategies.png (-T.png).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.ddp_overhead import SOURCE, machine, prepare_data
from mms_core.models import ModelSpec
from mms_core.training.spec import RankResult, TrainJob, TrainSpec

BENCH = "strategies"
HERE = Path(__file__).parent
WORLD_SIZES = (1, 2)


@dataclass(frozen=True)
class Config:
    """One benchmarked strategy: its label, ``training.strategy`` and extra TrainSpec fields."""

    label: str
    strategy: str
    extra: dict[str, Any] = field(default_factory=dict)


CONFIGS = (
    Config("ddp", "ddp"),
    Config("hierarchical", "hierarchical", {"hierarchical": {"group_size": 1}}),
    Config("param_server", "param_server", {"param_server": {"staleness_bound": None}}),
    Config("param_server_s0", "param_server", {"param_server": {"staleness_bound": 0}}),
    Config("fsdp", "fsdp"),
)


def make_job(
    *, config: Config, world_size: int, manifest_uri: str, workdir: Path, epochs: int, batch_size: int
) -> TrainJob:
    """The job of one run; its own output and checkpoint directory, never resuming."""
    train = TrainSpec(
        strategy=config.strategy,
        epochs=epochs,
        batch_size=batch_size,
        checkpoint_every=0,
        resume=False,
        world_size=world_size,
        timeout_s=120,
        **config.extra,
    )
    return TrainJob(
        manifest_uri=manifest_uri,
        model=ModelSpec(name="mlp", kwargs={"hidden": [256, 256]}),
        train=train,
        output_uri=str(workdir / "model.safetensors"),
        checkpoint_uri=str(workdir / "checkpoints"),
        num_threads=1,
    )


def run_once(*, job: TrainJob, world_size: int) -> tuple[list[RankResult], float, dict[str, float]]:
    """Train ``job`` on a fresh cluster of ``world_size`` one-thread processes.

    Returns:
        (results, wall seconds, CPU seconds during ``run_strategy``: the machine's and this
        process tree's).
    """
    from infra.cluster import dask_client
    from mms_core.config import Settings
    from mms_core.training.strategies import run_strategy

    settings = Settings(n_workers=world_size, threads_per_worker=1, dask_address=None)
    t0 = time.perf_counter()
    with dask_client(settings) as client:
        client.run(_import_training)  # every worker ready at once: see the module docstring
        before = cpu_snapshot()
        results = run_strategy(client=client, job=job)
        after = cpu_snapshot()
    return results, time.perf_counter() - t0, {k: round(after[k] - before[k], 2) for k in after}


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds so far: the whole machine's busy time, and this process tree's (the cluster's
    nannies and workers are its children). Their difference over a run is what other jobs on the
    box took meanwhile."""
    import psutil  # a dependency of distributed

    def used(t: Any) -> float:
        return t.user + t.system

    me = psutil.Process()
    own = 0.0
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a process may end between listing and reading
            own += used(p.cpu_times())
    total = psutil.cpu_times()
    busy = total.user + total.nice + total.system + total.irq + total.softirq + total.steal
    return {"machine_cpu_s": busy, "own_cpu_s": own}


def _import_training() -> None:
    """Import torch and the strategies in a worker (what its first task would otherwise do)."""
    import mms_core.training.strategies  # noqa: F401


def compact_stats(config: Config, results: list[RankResult]) -> dict[str, Any]:
    """The strategy figures worth a glance: sharding, groups and bytes, staleness."""
    s = results[0].stats
    if config.strategy == "fsdp":
        return {k: s.get(k) for k in ("fsdp_units", "local_params", "total_params")}
    if config.strategy == "hierarchical":
        return {k: s.get(k) for k in ("groups", "buckets", "inter_sent_bytes", "flat_sent_bytes")}
    if config.strategy == "param_server":
        return {k: s.get(k) for k in ("staleness_histogram", "server_versions")}
    return {}


def record(
    *,
    config: Config,
    world_size: int,
    rep: int,
    results: list[RankResult],
    wall_s: float,
    cpu: dict[str, float],
    job: TrainJob,
) -> dict:
    """One run as a JSON-ready dict (see the module docstring for the definitions)."""
    r0 = results[0]
    train_s = max(r.train_seconds for r in results)
    later = [m.samples_per_s for m in r0.history[1:]] or [m.samples_per_s for m in r0.history]
    return {
        "bench": BENCH,
        "strategy": config.label,
        "world_size": world_size,
        "rep": rep,
        "samples_per_s": round(r0.samples / train_s, 1),
        "epoch_samples_per_s": round(statistics.median(later), 1),
        "samples": r0.samples,
        "train_s": round(train_s, 3),
        "rank_train_s": [round(r.train_seconds, 3) for r in results],
        "wall_s": round(wall_s, 3),
        "steps": r0.steps,
        "epochs": job.train.epochs,
        "batch_size": job.train.batch_size,
        "final_val_accuracy": round(r0.history[-1].val_accuracy, 4) if r0.history else None,
        "params_sha256": r0.params_sha256[:16],
        "stats": compact_stats(config, results),
        "own_cpu_s": cpu["own_cpu_s"],
        "other_cpu_s": round(cpu["machine_cpu_s"] - cpu["own_cpu_s"], 2),
        "load_1m": round(os.getloadavg()[0], 2),
    }


def summaries(rows: list[dict]) -> list[dict]:
    """One line per (strategy, world size): medians, ratio to ddp, scaling 1 -> 2 workers."""
    med: dict[tuple[str, int], dict] = {}
    for c in CONFIGS:
        for ws in WORLD_SIZES:
            runs = [
                r for r in rows if r["strategy"] == c.label and r["world_size"] == ws and "error" not in r
            ]
            if runs:
                med[c.label, ws] = {
                    k: round(statistics.median(r[k] for r in runs), 3 if k.endswith("_s") else 1)
                    for k in ("samples_per_s", "epoch_samples_per_s", "train_s", "wall_s")
                } | {"n": len(runs), "params_sha256": sorted({r["params_sha256"] for r in runs})}

    def ratio(a: tuple[str, int], b: tuple[str, int]) -> float | None:
        return round(med[a]["samples_per_s"] / med[b]["samples_per_s"], 3) if a in med and b in med else None

    return [
        {
            "bench": BENCH,
            "stat": "median",
            "strategy": label,
            "world_size": ws,
            **m,
            "vs_ddp": ratio((label, ws), ("ddp", ws)),
            "scaling": ratio((label, 2), (label, 1)) if ws == 2 else None,
            # Same final weights as ddp, bit for bit (the synchronous strategies should be).
            "same_params_as_ddp": (
                m["params_sha256"] == med["ddp", ws]["params_sha256"] if ("ddp", ws) in med else None
            ),
        }
        for (label, ws), m in med.items()
    ]


def paths(tag: str) -> tuple[Path, Path]:
    """(JSON lines, plot) of a run: bench/data/strategies[-TAG].jsonl, bench/strategies[-TAG].png."""
    name = f"{BENCH}-{tag}" if tag else BENCH
    return HERE / "data" / f"{name}.jsonl", HERE / f"{name}.png"


def plot(summary: list[dict], *, title: str, out: Path) -> Path:
    """Grouped bars: median samples/s per strategy, one bar per world size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [c.label for c in CONFIGS if any(s["strategy"] == c.label for s in summary)]
    value = {(s["strategy"], s["world_size"]): s["samples_per_s"] for s in summary}
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.38
    for j, (ws, color) in enumerate(zip(WORLD_SIZES, ("#8ab", "#2a7"), strict=True)):
        xs = [i + (j - 0.5) * width for i in range(len(labels))]
        ys = [value.get((lab, ws), 0.0) for lab in labels]
        ax.bar(xs, ys, width, color=color, label=f"{ws} worker{'s' if ws > 1 else ''}")
        for x, y in zip(xs, ys, strict=True):
            ax.text(x, y, f"{y:,.0f}", ha="center", va="bottom", fontsize=8)
    ticks = {"param_server": "param_server\n(async)", "param_server_s0": "param_server\n(staleness 0)"}
    ax.set_xticks(range(len(labels)), [ticks.get(lab, lab) for lab in labels])
    ax.set(ylabel="samples/s (median)", title=title)
    ax.set_ylim(0, max(value.values(), default=1) * 1.15)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_title(line: dict) -> str:
    """The plot's title from a summary line's stamp."""
    return (
        f"MLP 256x256, batch {line['batch_size']}/worker, {line['epochs']} epochs, "
        f"median of {line['n']}; {line['machine'].split('nproc=')[-1]} CPU cores"
    )


def load_avg() -> str:
    """The 1, 5 and 15 minute load averages (other jobs on the box skew the 2-worker runs most)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_bench(
    *,
    epochs: int,
    batch_size: int,
    reps: int,
    emit: Callable[[dict[str, Any]], None],
    configs: tuple[Config, ...] = CONFIGS,
    png: Path | None = None,
    command: str = "",
) -> list[dict]:
    """Prepare the data once, run each (config, world size) ``reps`` times, alternating; the summary."""
    stamp = {
        "machine": machine(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "source": SOURCE,
        "epochs": epochs,
        "batch_size": batch_size,
    }
    emit({"bench": BENCH, "stat": "start", "load_avg": load_avg(), **stamp})
    t0 = time.perf_counter()
    order = [(c, ws) for c in configs for ws in WORLD_SIZES]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mms-bench-strategies-") as tmp:
        manifest_uri = prepare_data(root=str(Path(tmp) / "data"))
        for rep in range(1, reps + 1):
            for n, (config, ws) in enumerate(order if rep % 2 else order[::-1]):
                job = make_job(
                    config=config,
                    world_size=ws,
                    manifest_uri=manifest_uri,
                    workdir=Path(tmp) / f"run-{rep}-{n}",
                    epochs=epochs,
                    batch_size=batch_size,
                )
                rows.append(measure(config=config, world_size=ws, rep=rep, job=job) | stamp)
                emit(rows[-1])
    summary = [s | stamp for s in summaries(rows)]
    for s in summary:
        emit(s)
    elapsed = round(time.perf_counter() - t0, 1)
    emit({"bench": BENCH, "stat": "end", "load_avg": load_avg(), "elapsed_s": elapsed, **stamp})
    if png and summary:
        plot(summary, title=plot_title(summary[0]), out=png)
    return summary


def measure(*, config: Config, world_size: int, rep: int, job: TrainJob) -> dict:
    """One run's line; a failed run gives a line with ``error`` (the others' figures still count)."""
    try:
        results, wall, cpu = run_once(job=job, world_size=world_size)
    except Exception as exc:  # any strategy's failure: report it and go on
        return {
            "bench": BENCH,
            "strategy": config.label,
            "world_size": world_size,
            "rep": rep,
            "error": repr(exc),
        }
    return record(
        config=config, world_size=world_size, rep=rep, results=results, wall_s=wall, cpu=cpu, job=job
    )


def emitter(path: Path) -> Callable[[dict[str, Any]], None]:
    """Print each line (flushed, so progress shows) and append it to ``path``, emptied first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")

    def emit(obj: dict[str, Any]) -> None:
        line = json.dumps(obj)
        print(line, flush=True)
        with path.open("a") as f:
            f.write(line + "\n")

    return emit


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description="samples/s of ddp, hierarchical, param_server, fsdp on 1 and 2 workers."
    )
    parser.add_argument("--epochs", type=int, default=4, help="Epochs per run (default: %(default)s).")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="Rows per step per worker (default: %(default)s)."
    )
    parser.add_argument(
        "--reps", type=int, default=2, help="Runs of each configuration, alternating (default: %(default)s)."
    )
    parser.add_argument(
        "--only",
        default=",".join(c.label for c in CONFIGS),
        help="Comma-separated configurations to run (default: all, %(default)s).",
    )
    parser.add_argument(
        "--tag", default="", help="Write strategies-TAG.jsonl/.png instead (e.g. for a non-default batch)."
    )
    parser.add_argument("--plot-only", action="store_true", help="Redraw the plot from the JSON lines.")
    args = parser.parse_args(argv)
    data, png = paths(args.tag)
    if args.plot_only:
        lines = [json.loads(x) for x in data.read_text().splitlines() if x.strip()]
        summary = [x for x in lines if x.get("stat") == "median"]
        print(plot(summary, title=plot_title(summary[0]), out=png))
        return
    wanted = set(args.only.split(","))
    if unknown := wanted - {c.label for c in CONFIGS}:
        parser.error(f"unknown configuration(s) {sorted(unknown)}")
    run_bench(
        epochs=args.epochs,
        batch_size=args.batch_size,
        reps=args.reps,
        emit=emitter(data),
        configs=tuple(c for c in CONFIGS if c.label in wanted),
        png=png,
        command=" ".join(
            ["python -m bench.strategies", f"--epochs {args.epochs} --batch-size {args.batch_size}"]
            + [f"--reps {args.reps}", f"--only {args.only}", f"--tag {args.tag}" if args.tag else ""]
        ).strip(),
    )


if __name__ == "__main__":
    main()
