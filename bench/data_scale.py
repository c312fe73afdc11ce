"""Data at scale: `mms run`'s ingest and sharding of a GiB-sized Parquet table against
dask.dataframe doing the same work and a pyarrow read + write floor, with memory over time.

    python -m bench.data_scale [--size quick|full] [--rows N] [--reps R] [--out PATH]
        [--tmp-dir DIR] [--table PATH]

The table is generated here, chunk by chunk through a pyarrow ParquetWriter (one row group per
chunk, so generating it holds one chunk): ``--size quick`` 8,000,000 rows (~1 GiB in memory),
``full`` 32,000,000 (~4 GiB), ``--rows N`` any size (tests); 32 float32 features (standard normal)
and an int64 label in 4 classes, the argmax of a fixed random projection of the features (learnable,
so the run trains meaningfully). It lies in a temporary directory outside the repository
(``--tmp-dir``), or ``--table`` reuses an existing one. Each rep runs, in an order rotated rep by rep:

- ``mms``: ``mms run examples/digits.yaml`` with the table as data.source (MMS_OVERRIDES), in a
  fresh MMS_HOME. ``work_s`` = ingest + preprocess-and-shard: from the ingest task run's start to the
  preprocess-and-shard task run's end, read back from the home's embedded Prefect server (REST API);
  ``wall_s`` = the whole command, spawn to exit.
- ``dask``: dask.dataframe on a LocalCluster of 2 workers x 1 thread (processes, 4 GiB each, as the
  flow's cluster) in a child process: read -> seeded split -> train mean/std -> standardise -> 8
  train shards + val + test as Parquet (``dask_child``). ``work_s`` = the cluster's start
  (``cluster_start_s``; the flow's ingest waits for its own cluster's start too) + ``compute_s``;
  ``wall_s`` is the child process, spawn to exit (imports included).
- ``pyarrow``: ``pq.read_table`` + ``pq.write_table`` of the whole table in a child; ``work_s``.

Memory: every 0.2 s (psutil) the RSS of the contender's process and of its descendants, found
anew at each sample and named by command line: ``flow`` (the `mms` process, where the flow, the
Dask scheduler and the nannies run), ``dask_worker`` (a child started by multiprocessing's spawn:
a Dask worker), ``main`` (a child benchmark process), ``other``. The embedded Prefect server
(``infra.prefect_keeper``, its own session) and its children are left out. Each process's peak and
time series go into the data; ``tree_peak_mib`` is the peak of their sum.

Writes JSON lines to ``--out`` (default bench/data/data_scale.jsonl), also printed: a ``table``
line, one ``run`` line per contender and rep, a ``summary`` line (medians; median and range of
the per-rep ratios of ``work_s``: mms/dask, mms/pyarrow, and mms/dask's ``compute_s``; the
goals). The file keeps the newest run of every other size, so the 1 GiB and 4 GiB runs sit side by
side (bench.report compares the worker peaks across them). Every line carries bench, machine,
date (the run's start, UTC), size, rows, revision and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._scale_runs import GOALS, child_env, peak, run_sampled, summarize

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "bench" / "data"
OUT = DATA / "data_scale.jsonl"
PNG = REPO / "bench" / "data_scale.png"
SIZES = {"quick": 8_000_000, "full": 32_000_000}
N_FEATURES, N_CLASSES, CHUNK_ROWS = 32, 4, 500_000
N_SHARDS, VAL_FRACTION, TEST_FRACTION, SEED = 8, 0.15, 0.15, 0  # examples/digits.yaml's split
SERIES = ("t", "rss_mib")  # a process's memory series: in the data file, not on the terminal
MMS_OVERRIDES = (
    "data.label=label", "training.epochs=1", "training.batch_size=4096", f"preprocess.n_shards={N_SHARDS}",
)  # fmt: skip
MMS_TASKS = ("ingest", "preprocess-and-shard")


# ---- the table -----------------------------------------------------------------------------------
def generate_table(path: Path, *, rows: int, seed: int = 0) -> dict:
    """Write the benchmark's table to ``path`` in CHUNK_ROWS chunks; what it holds and how long it took."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    projection = np.random.default_rng(seed).standard_normal((N_FEATURES, N_CLASSES)).astype(np.float32)
    names = [f"f{i}" for i in range(N_FEATURES)]
    schema = pa.schema([*(pa.field(n, pa.float32()) for n in names), pa.field("label", pa.int64())])
    counts = np.zeros(N_CLASSES, dtype=np.int64)
    with pq.ParquetWriter(path, schema) as writer:
        for i, start in enumerate(range(0, rows, CHUNK_ROWS)):
            shape = (min(CHUNK_ROWS, rows - start), N_FEATURES)
            x = np.random.default_rng([seed, i]).standard_normal(shape, dtype=np.float32)
            y = (x @ projection).argmax(axis=1).astype(np.int64)
            counts += np.bincount(y, minlength=N_CLASSES)
            writer.write_table(pa.Table.from_arrays([*x.T, y], schema=schema))
    meta = pq.ParquetFile(path).metadata
    return {
        "rows": rows, "features": N_FEATURES, "classes": N_CLASSES, "class_counts": counts.tolist(),
        "bytes_in_memory": rows * (4 * N_FEATURES + 8), "bytes_on_disk": path.stat().st_size,
        "row_groups": meta.num_row_groups, "generate_s": round(time.perf_counter() - t0, 2),
    }  # fmt: skip


# ---- the three contenders ------------------------------------------------------------------------
def run_mms(table: Path, *, scratch: Path, timeout_s: float) -> dict:
    """`mms run` on ``table`` in a fresh MMS_HOME; its task times come from the home's Prefect API."""
    from infra.embedded_prefect import stop

    home = scratch / "home"
    sets = [x for o in (f"data.source=file://{table}", *MMS_OVERRIDES) for x in ("--set", o)]
    cmd = [str(Path(sys.executable).with_name("mms")), "run", "examples/digits.yaml", *sets]
    env = child_env(MMS_HOME=str(home), MMS_PREFECT_IDLE_S="600", COLUMNS="200")  # wide: one-line summary
    try:
        run = run_sampled(cmd, env=env, root_role="flow", logs=scratch / "logs", timeout_s=timeout_s)
        out = {"mms_command": " ".join(["mms", *cmd[1:]]), **_outcome(run)}
        if out["ok"]:
            try:
                out |= _ingest_and_shard(run, home=home)
            except Exception as exc:  # e.g. renamed tasks: the run's other figures still count
                out |= {"ok": False, "error": f"task times: {type(exc).__name__}: {exc}"}
        out |= {"flow_peak_mib": peak(run, "flow"), "worker_peak_mib": peak(run, "dask_worker")}
        return out
    finally:
        stop(home=home)  # `mms run` leaves the home's Prefect server up for the next command
        shutil.rmtree(home, ignore_errors=True)


def _ingest_and_shard(run: dict, *, home: Path) -> dict:
    """The ingest + shard window (seconds since spawn) from the task runs, and the peaks within it."""
    tasks = task_times(home)
    start = tasks[MMS_TASKS[0]]["start_unix"] - run["t0_unix"]
    end = tasks[MMS_TASKS[-1]]["end_unix"] - run["t0_unix"]
    out = {"work_s": round(end - start, 2), "window": [round(start, 2), round(end, 2)]}
    out |= {f"{k.replace('-', '_')}_s": tasks[k]["run_s"] for k in MMS_TASKS} | {"tasks": tasks}
    out |= {"accuracy": _accuracy(run["stdout"]), "rows_out": _manifest_rows(home)}
    out["flow_peak_ingest_shard_mib"] = peak(run, "flow", (start, end))
    return out | {"worker_peak_ingest_shard_mib": peak(run, "dask_worker", (start, end))}


def _outcome(run: dict) -> dict:
    """What every contender's line carries from its sampled run."""
    error = None if run["rc"] == 0 else f"exit status {run['rc']}: {' / '.join(run['stderr_tail'])[-600:]}"
    keep = ("wall_s", "tree_peak_mib", "processes", "t0_unix")
    return {"ok": run["rc"] == 0, "error": error, "rc": run["rc"]} | {k: run[k] for k in keep}


def task_times(home: Path) -> dict[str, dict]:
    """Start, end (Unix seconds), run seconds and state of each task run of the home's one flow run."""
    import httpx

    from infra.embedded_prefect import acquire

    lease = acquire(home=home, idle_s=60)  # the server `mms run` left running (or the same DB anew)
    try:
        with httpx.Client(base_url=lease.wait_ready(timeout_s=180), timeout=60) as http:
            flows = http.post("/flow_runs/filter", json={"limit": 10}).raise_for_status().json()
            if len(flows) != 1:
                raise RuntimeError(f"expected one flow run in the fresh home {home}, found {len(flows)}")
            body = {"flow_runs": {"id": {"any_": [flows[0]["id"]]}}}
            runs = http.post("/task_runs/filter", json=body).raise_for_status().json()
    finally:
        lease.release()
    stamp = lambda s: dt.datetime.fromisoformat(s).timestamp() if s else None  # noqa: E731
    return {
        r["name"].rsplit("-", 1)[0]: {
            "start_unix": stamp(r["start_time"]), "end_unix": stamp(r["end_time"]),
            "run_s": round(r["total_run_time"], 3), "state": r["state_name"],
        }
        for r in runs
    }  # fmt: skip


def _accuracy(stdout: str) -> float | None:
    found = re.search(r"test accuracy / macro-F1\W+([0-9.]+)", stdout)
    return float(found.group(1)) if found else None


def _manifest_rows(home: Path) -> int | None:
    """Rows in the shards the run wrote (train + val + test), from their manifest."""
    manifests = list((home / "data" / "shards").glob("*/manifest.json"))
    if len(manifests) != 1:
        return None
    m = json.loads(manifests[0].read_text())
    return sum(s["rows"] for s in m["train"]) + m["val"]["rows"] + m["test"]["rows"]


def run_child(kind: str, table: Path, *, scratch: Path, timeout_s: float) -> dict:
    """``dask`` or ``pyarrow`` in a child process (this module, ``--child``), its tree sampled."""
    dest = scratch / "out"
    cmd = [sys.executable, "-m", "bench.data_scale", "--child", kind, "--table", str(table)]
    cmd += ["--dest", str(dest)]
    run = run_sampled(cmd, env=child_env(), root_role="main", logs=scratch / "logs", timeout_s=timeout_s)
    out = _outcome(run)
    result = [json.loads(x) for x in run["stdout"].splitlines() if x.startswith('{"child_result"')]
    if out["ok"] and not result:
        out |= {"ok": False, "error": "the child printed no result"}
    out |= {k: v for k, v in (result or [{}])[-1].items() if k != "child_result"}
    out |= {"main_peak_mib": peak(run, "main"), "worker_peak_mib": peak(run, "dask_worker")}
    if out["ok"]:
        out["rows_out"] = _parquet_rows(dest)
    return out  # the caller removes ``scratch``, output included


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def dask_child(table: Path, dest: Path) -> dict:
    """The baseline: idiomatic dask.dataframe for ingest + split + standardise + shard."""
    import dask
    import dask.dataframe as dd
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
        memory_limit="4GiB",
    )  # fmt: skip
    with cluster, Client(cluster):
        t1 = time.perf_counter()
        df = dd.read_parquet(str(table))
        features = [c for c in df.columns if c != "label"]
        fractions = [TEST_FRACTION, VAL_FRACTION, 1 - TEST_FRACTION - VAL_FRACTION]
        test, val, train = df.random_split(fractions, random_state=SEED)
        mean, std = dask.compute(train[features].mean(), train[features].std(ddof=0))
        std = std.where(std > 1e-6, 1.0)
        writes = [
            part.assign(**{c: ((part[c] - mean[c]) / std[c]).astype("float32") for c in features})
            .repartition(npartitions=n)
            .to_parquet(str(dest / name), write_index=False, compute=False)
            for name, part, n in (("train", train, N_SHARDS), ("val", val, 1), ("test", test, 1))
        ]
        dask.compute(*writes)  # one graph: the three splits share one read of the table
        t2 = time.perf_counter()
    return {"cluster_start_s": round(t1 - t0, 2), "compute_s": round(t2 - t1, 2), "work_s": round(t2 - t0, 2)}


def pyarrow_child(table: Path, dest: Path) -> dict:
    """The floor: read the whole table and write it back, nothing else."""
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    data = pq.read_table(table)
    t1 = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(data, dest)
    t2 = time.perf_counter()
    return {"read_s": round(t1 - t0, 2), "write_s": round(t2 - t1, 2), "work_s": round(t2 - t0, 2)}


RUNNERS = {
    "mms": run_mms,
    "dask": lambda table, **kw: run_child("dask", table, **kw),
    "pyarrow": lambda table, **kw: run_child("pyarrow", table, **kw),
}
CHILDREN = {"dask": dask_child, "pyarrow": pyarrow_child}


# ---- data file, plot -----------------------------------------------------------------------------
def write_out(path: Path, lines: list[dict], *, size: str) -> None:
    """Replace ``path``'s lines of ``size`` by ``lines``, keeping the other sizes' (atomic rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if path.exists():
        kept = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x).get("size") != size]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(x + "\n" for x in kept) + "".join(json.dumps(x) + "\n" for x in lines))
    tmp.replace(path)


def newest_by_size(lines: list[dict]) -> dict[str, list[dict]]:
    """Each size's lines of its newest run (by the run's date), sizes in order of rows."""
    runs: dict[str, dict[str, list[dict]]] = {}
    for x in lines:
        if x.get("bench") == "data_scale":
            runs.setdefault(x["size"], {}).setdefault(x["date"], []).append(x)
    newest = {size: by_date[max(by_date)] for size, by_date in runs.items()}
    return dict(sorted(newest.items(), key=lambda kv: kv[1][0]["rows"]))


def plot(lines: list[dict], out: Path = PNG) -> Path:
    """RSS over time of `mms run`'s flow process and Dask workers (the last good rep of each size),
    the ingest + shard window shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = {
        size: good[-1]
        for size, runs in newest_by_size(lines).items()
        if (good := [r for r in runs if r.get("contender") == "mms" and r["ok"] and r.get("processes")])
    }
    if not sizes:
        raise KeyError("no successful mms run with a memory series")
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 3.8), squeeze=False)
    for ax, (size, run) in zip(axes[0], sizes.items(), strict=True):
        workers = 0
        for p in (p for p in run["processes"] if p["role"] in ("flow", "dask_worker")):
            workers += p["role"] == "dask_worker"
            label = "flow process (mms)" if p["role"] == "flow" else f"Dask worker {workers} (pid {p['pid']})"
            ax.plot(p["t"], [r / 1024 for r in p["rss_mib"]], label=label, lw=1.2)
        if run.get("window"):
            ax.axvspan(*run["window"], color="#ddd", zorder=0, label="ingest + preprocess-and-shard")
        ax.axhline(GOALS["flow_peak_mib"] / 1024, color="#c55", lw=0.8, ls="--", label="flow goal: < 1 GiB")
        gib = run["rows"] * (4 * N_FEATURES + 8) / 2**30
        ax.set(xlabel="seconds since `mms run` started", ylabel="RSS (GiB)", ylim=(0, None))
        ax.set_title(f"{size}: {run['rows']:,} rows ({gib:.3g} GiB), rep {run['rep']}, {run['date'][:10]}")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---- the run -------------------------------------------------------------------------------------
def revision() -> str:
    """HEAD's short hash, '+dirty' when the working tree differs from it (read-only git commands)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff-index", "--quiet", "HEAD", "--"], cwd=REPO, capture_output=True)
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty.returncode == 1 else "")


def run_stamp(*, size: str, rows: int, argv: list[str]) -> dict:
    """What every line of this run carries."""
    gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return {
        "bench": "data_scale",
        "machine": f"{platform.platform()} nproc={len(os.sched_getaffinity(0))} mem={gib:.0f}GiB",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "size": size, "rows": rows, "revision": revision(),
        "command": " ".join(["python -m bench.data_scale", *argv]),
    }  # fmt: skip


def emit(line: dict, into: list[dict]) -> None:
    """Keep the line for the data file; print it without its memory series."""
    into.append(line)
    shown = dict(line)
    if "processes" in shown:
        shown["processes"] = [{k: v for k, v in p.items() if k not in SERIES} for p in line["processes"]]
    print(json.dumps(shown), flush=True)


def measure(*, table: Path, reps: int, scratch: Path, stamp: dict, timeout_s: float, into: list) -> None:
    """The reps, the contenders' order rotated each rep (so none always goes first); then the summary."""
    names = list(RUNNERS)
    runs = []
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for position, name in enumerate(order):
            where = scratch / f"rep{rep}-{name}"
            print(f"data_scale: rep {rep + 1}/{reps}: {name}", file=sys.stderr, flush=True)
            line = stamp | {"kind": "run", "contender": name, "rep": rep, "position": position}
            line |= RUNNERS[name](table, scratch=where, timeout_s=timeout_s)
            shutil.rmtree(where, ignore_errors=True)
            if not line["ok"]:
                print(f"data_scale: {name} failed: {line['error']}", file=sys.stderr, flush=True)
            emit(line, into)
            runs.append(line)
    emit(stamp | summarize(runs), into)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``--child`` runs one baseline; see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="quick", help="quick ~1 GiB, full ~4 GiB")
    parser.add_argument("--rows", type=int, help="Rows of the table (overrides --size; size 'rows=N').")
    parser.add_argument("--reps", type=int, default=3, help="Reps of each contender (rotated order).")
    parser.add_argument("--out", type=Path, default=OUT, help="JSON-lines data file (other sizes kept).")
    parser.add_argument("--tmp-dir", type=Path, help="Where the table and outputs go (default: system temp).")
    parser.add_argument("--table", type=Path, help="Reuse this Parquet table instead of generating one.")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="Kill a contender after this.")
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--dest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps({"child_result": True} | CHILDREN[args.child](args.table, args.dest)), flush=True)
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="mms-bench-data-scale-", dir=args.tmp_dir))
    lines: list[dict] = []
    try:
        table = args.table or scratch / "table.parquet"
        rows = args.rows or SIZES[args.size]
        info = {"generated": args.table is None}
        info |= generate_table(table, rows=rows) if args.table is None else {"rows": _parquet_rows(table)}
        size = args.size if info["rows"] == SIZES[args.size] else f"rows={info['rows']}"
        stamp = run_stamp(size=size, rows=info["rows"], argv=argv)
        emit(stamp | {"kind": "table", "table": str(table)} | info, lines)
        kw = {"reps": args.reps, "scratch": scratch, "stamp": stamp, "timeout_s": args.timeout_s}
        measure(table=table, into=lines, **kw)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_out(args.out, lines, size=size)
    print(f"data_scale: {len(lines)} lines -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
