"""Every benchmark, one after the other, then the plots and bench/RESULTS.md: what `make bench` runs.

    python -m bench.run_all [--size quick|full] [--only NAME,NAME...] [--no-report]

``--size quick`` (the default, and `make bench`'s) shrinks the slow benchmarks so that the whole
run fits in about 20 minutes on a 2-core box (fewer epochs, repetitions, seeds, load levels or
starts: see BENCHES); ``--size full`` runs each benchmark at its own defaults (~55 minutes on a
quiet 2-core box, 30 of them the start-up benchmark's 20 starts of every mode). Each benchmark
runs as ``python -m bench.NAME ARGS`` in a subprocess: its JSON
lines go to bench/data/NAME.jsonl (from its stdout, or written by the benchmark itself), its
stderr to the terminal. A benchmark that fails leaves its previous data file in place (what it
printed goes to a temporary directory named in the record) and the run goes on.

bench/data/make_bench.jsonl records the run: the machine (platform, cores, memory, library
versions), the size, and per benchmark its command, exit status and wall seconds; bench.report
puts these into the header of bench/RESULTS.md. ``--only`` reruns some benchmarks and keeps the
other benchmarks' records.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).parent
DATA = HERE / "data"
RECORD = DATA / "make_bench.jsonl"
VERSIONS = ("torch", "dask", "distributed", "prefect", "mlflow", "fastapi", "uvicorn")


@dataclass(frozen=True)
class Bench:
    """One benchmark invocation and where its JSON lines go."""

    name: str  # also its data file: bench/data/NAME.jsonl
    module: str
    quick: tuple[str, ...] = ()
    full: tuple[str, ...] = ()
    captures_stdout: bool = True  # False: the benchmark writes bench/data/NAME.jsonl itself
    fresh: bool = False  # remove the data file first (the benchmark appends to it)


GPT_CPU = (
    *("--size", "tiny", "--seq", "64", "--batch", "8", "--steps", "30", "--warmup", "5", "--epochs", "2"),
    *("--mms", "both", "--device", "cpu", "--out", "bench/data/gpt_throughput_cpu.jsonl"),
)
BENCHES = (
    # full: 3 pairs of ours/baseline `mms run` (fresh home, then the same home: ~6 min); quick: 2 (~4 min)
    Bench("pipeline_walltime", "bench.pipeline_walltime", quick=("--pairs", "2")),
    # full: 20 starts of each of our 3 modes and of the 2 baselines (~30 min: a round of all 5 took ~90 s
    # under its CPU hog on 2 cores); quick: 3 and 2 (~5 min: ~80 s of warm-ups, then ~40 s per round of
    # ours and ~50 s more in a round with the baselines)
    Bench(
        "orchestration_startup",
        "bench.orchestration_startup",
        quick=("--starts", "3", "--baseline-starts", "2"),
    ),
    # full: 8 epochs, 6 reps each (~4 min per invocation); quick: 4 epochs, 6 reps (~2 min): the
    # headline is the median of the per-rep ratios, which the box's drift moves by +-15% a rep;
    # an even number of reps puts each path first equally often
    Bench("ddp_overhead_mms", "bench.ddp_overhead", quick=("--epochs", "4", "--reps", "6")),
    Bench(
        "ddp_overhead_dask_default",
        "bench.ddp_overhead",
        quick=("--epochs", "4", "--reps", "2", "--dask-malloc-trim", "dask-default"),
        full=("--reps", "2", "--dask-malloc-trim", "dask-default"),
    ),
    Bench("batch_predict", "bench.batch_predict", quick=("--rows", "200000")),  # full: 400,000 rows
    # quick: a ~1 GiB table (8M rows), 2 reps of `mms run`, dask.dataframe and pyarrow; full: ~4 GiB (32M
    # rows), 3 reps. It writes its data file itself and keeps the other size's run there (report: both)
    Bench(
        "data_scale",
        "bench.data_scale",
        quick=("--size", "quick", "--reps", "2"),
        full=("--size", "full"),
        captures_stdout=False,
    ),
    Bench("compress", "bench.compress"),  # ~15 s
    # full: 2 reps (~3 min); quick: 1 rep of each (strategy, world size) (~1.5 min)
    Bench("strategies", "bench.strategies", quick=("--reps", "1"), captures_stdout=False),
    # full: 2 epochs (~2 min); quick: 1
    Bench("comm_bytes", "bench.comm_bytes", quick=("--epochs", "1"), captures_stdout=False, fresh=True),
    # full: 3 seeds x full lr grids (~4.5 min); quick: 1 seed, 2 rates per setting
    Bench("fedavg_table", "bench.fedavg_table", quick=("--quick",)),
    # full: 7 load levels, 2 s each, MLflow -w 1 and -w 2, the CLI (~4 min); quick: 3 levels, 1 s;
    # then ours vs dc58bb3's server, alternating pairs (full: 8 x 2 s, ~2.5 min; quick: 4 x 1 s, ~1 min)
    Bench("serving", "bench.serving", quick=("--quick",)),
    # GPT on CPU at tiny size, both sizes (~1 min): checks plain, run_ddp and `mms run` agree. The
    # 124M GPU figure comes from the device tool (gpt_throughput.py's docstring), never from here.
    Bench(
        "gpt_throughput_cpu",
        "bench.gpt_throughput",
        quick=GPT_CPU,
        full=GPT_CPU,
        captures_stdout=False,
        fresh=True,
    ),
)


def command(bench: Bench, *, size: str) -> list[str]:
    """The benchmark's command line at ``size``."""
    return ["python", "-m", bench.module, *(bench.quick if size == "quick" else bench.full)]


def machine() -> dict:
    """Where the run happens: platform, cores, memory, Python and library versions."""
    found = {}
    for name in VERSIONS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(pages * page_size / 2**30, 1),
        "python": platform.python_version(),
        "versions": found,
    }


def run_one(bench: Bench, *, size: str) -> dict:
    """Run one benchmark; its stdout (JSON lines) into its data file unless it writes its own.

    On failure the data file keeps its previous content; what the run printed is left in a
    temporary directory, named in the record (``partial_output``).
    """
    out = DATA / f"{bench.name}.jsonl"
    scratch = Path(tempfile.mkdtemp(prefix=f"mms-bench-{bench.name}-"))
    cmd = command(bench, size=size)
    print(f"[bench] {bench.name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    if not bench.captures_stdout and out.exists():  # it writes the file itself: keep the old one aside
        (shutil.move if bench.fresh else shutil.copy2)(out, scratch / "previous.jsonl")
    t0 = time.perf_counter()
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if bench.captures_stdout:
        part = out.with_name(f".{out.name}.part")  # beside the target, so the rename is atomic
        with (
            part.open("w") as f,
            subprocess.Popen([sys.executable, *cmd[1:]], stdout=subprocess.PIPE, text=True) as p,
        ):
            for line in p.stdout:  # tee: the terminal and the data file
                sys.stdout.write(line)
                sys.stdout.flush()
                if line.startswith("{"):
                    f.write(line)
        rc = p.returncode
        if rc == 0:
            part.replace(out)
        else:
            shutil.move(part, scratch / out.name)
    else:
        rc = subprocess.run([sys.executable, *cmd[1:]], check=False).returncode
        if rc != 0 and out.exists():
            shutil.move(out, scratch / out.name)
        if rc != 0 and (scratch / "previous.jsonl").exists():
            shutil.move(scratch / "previous.jsonl", out)
    wall = round(time.perf_counter() - t0, 1)
    print(f"[bench] {bench.name}: rc={rc}, {wall:.0f} s", file=sys.stderr, flush=True)
    record = {"kind": "bench", "name": bench.name, "command": " ".join(cmd), "rc": rc}
    record |= {"wall_s": wall, "started": started}
    if rc != 0:
        record["partial_output"] = str(scratch)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return record


def read_record() -> dict[str, dict]:
    """The previous run's benchmark lines by name (for ``--only``)."""
    if not RECORD.exists():
        return {}
    lines = [json.loads(x) for x in RECORD.read_text().splitlines() if x.strip()]
    return {x["name"]: x for x in lines if x.get("kind") == "bench"}


def write_record(lines: list[dict]) -> None:
    """Replace bench/data/make_bench.jsonl atomically."""
    tmp = RECORD.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    tmp.replace(RECORD)


def step(cmd: list[str]) -> float:
    """Run a post-processing step (plots, report); its wall seconds."""
    print(f"[bench] {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *cmd[1:]], check=True)
    return round(time.perf_counter() - t0, 1)


def print_summary(records: list[dict], *, total: float) -> list[str]:
    """Each benchmark's wall time and status, and the total, on stderr; the names that failed."""
    for r in records:
        print(f"[bench] {r['name']:28s} {r['wall_s']:7.1f} s  rc={r['rc']}", file=sys.stderr)
    failed = [r["name"] for r in records if r["rc"] != 0]
    print(
        f"[bench] total {total:.0f} s ({total / 60:.1f} min); failed: {', '.join(failed) or 'none'}",
        file=sys.stderr,
    )
    return failed


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["quick", "full"], default="quick")
    parser.add_argument("--only", default="", help="Comma-separated benchmark names (default: all).")
    parser.add_argument("--no-report", action="store_true", help="Skip bench.plot and bench.report.")
    args = parser.parse_args(argv)
    names = {b.name for b in BENCHES}
    wanted = set(args.only.split(",")) - {""} or names
    if unknown := wanted - names:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(sorted(names))}")
    DATA.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    previous = read_record() if args.only else {}
    start = {
        "kind": "run",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "size": args.size,
        "command": (
            f"python -m bench.run_all --size {args.size} --only {args.only}"
            if args.only
            else "make bench" + ("" if args.size == "quick" else f" BENCH_SIZE={args.size}")
        ),
        "only": sorted(wanted) if args.only else None,
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        **machine(),
    }
    done: dict[str, dict] = dict(previous)
    for bench in BENCHES:
        if bench.name in wanted:
            done[bench.name] = run_one(bench, size=args.size) | {"size": args.size}
            write_record([start, *(done[b.name] for b in BENCHES if b.name in done)])
    bench_s = round(time.perf_counter() - t0, 1)
    end = {"kind": "end", "benchmarks_s": bench_s, "load_avg_end": [round(x, 2) for x in os.getloadavg()]}
    write_record([start, *(done[b.name] for b in BENCHES if b.name in done), end])
    if not args.no_report:
        step(["python", "-m", "bench.plot"])
        step(["python", "-m", "bench.report"])
    failed = print_summary(
        [done[b.name] for b in BENCHES if b.name in wanted], total=time.perf_counter() - t0
    )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
