"""bench.data_scale: the summary, the data file that keeps the other size, the report section and
the plot on fixture lines; then the real benchmark at a tiny size (slow): `mms run`, dask.dataframe
and pyarrow on a 20,000-row table, fields and sane values, and the section rendered from its data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bench import _scale_runs, data_scale, report

REPO = Path(__file__).resolve().parents[2]
MACHINE = "Linux-test nproc=2 mem=8GiB"


def stamp(size: str, rows: int, date: str) -> dict:
    return {"bench": "data_scale", "machine": MACHINE, "date": date, "size": size, "rows": rows} | {
        "revision": "abc1234", "command": f"python -m bench.data_scale --size {size}",
    }  # fmt: skip


def series(role: str, peak: float) -> dict:
    return {"pid": 1 if role == "flow" else 2, "role": role, "cmd": role, "peak_rss_mib": peak} | {
        "t": [0.0, 1.0, 2.0], "rss_mib": [peak / 2, peak, peak / 3],
    }  # fmt: skip


def run_line(
    s: dict, contender: str, rep: int, work: float, *, worker: float = 800.0, ok: bool = True
) -> dict:
    line = s | {"kind": "run", "contender": contender, "rep": rep, "ok": ok, "wall_s": work + 10.0}
    line |= {"work_s": work, "error": None if ok else "exit status 1: boom", "tree_peak_mib": 2000.0}
    if contender == "mms":
        line |= {"window": [0.5, 1.5], "ingest_s": work * 0.4, "preprocess_and_shard_s": work * 0.6}
        line |= {"flow_peak_mib": 700.0, "flow_peak_ingest_shard_mib": 650.0, "worker_peak_mib": worker}
        line |= {"worker_peak_ingest_shard_mib": worker - 100, "accuracy": 0.97}
        line["processes"] = [series("flow", 700.0), series("dask_worker", worker)]
    if contender == "dask":
        line |= {"cluster_start_s": 2.0, "compute_s": work - 2.0}
    return line


def fixture_run(size: str, rows: int, date: str, *, worker: float) -> list[dict]:
    s = stamp(size, rows, date)
    figures = [
        (12.0, 10.0, 4.0, True),
        (11.0, 10.0, 5.0, True),
        (30.0, 10.0, 5.0, False),
    ]  # mms, dask, pyarrow
    runs = []
    for rep, (mms, dask, pyarrow, ok) in enumerate(figures):
        runs.append(run_line(s, "mms", rep, mms, worker=worker, ok=ok))
        runs += [run_line(s, "dask", rep, dask), run_line(s, "pyarrow", rep, pyarrow)]
    table = s | {"kind": "table", "rows": rows, "bytes_in_memory": rows * 136, "bytes_on_disk": rows * 140}
    return [table | {"row_groups": 16}, *runs, s | _scale_runs.summarize(runs)]


def test_summary_ratios_per_rep_and_goals() -> None:
    summary = fixture_run("quick", 8_000_000, "2026-12-03T10:00:00+00:00", worker=800.0)[-1]
    # per-rep ratios of the reps where both ran; the failed mms rep is left out
    assert summary["ratios"]["vs_dask"] == {
        "median": 1.15,
        "min": 1.1,
        "max": 1.2,
        "n": 2,
        "values": [1.2, 1.1],
    }
    assert summary["ratios"]["vs_dask_compute"]["values"] == [1.5, 1.375]
    assert summary["ratios"]["vs_pyarrow"]["values"] == [3.0, 2.2]
    assert summary["mms_work_s"] == 11.5 and summary["dask_work_s"] == 10.0 and summary["reps"] == 3
    assert summary["completed"] is False and summary["errors"] == ["mms rep 2: exit status 1: boom"]
    assert summary["meets"] == {"vs_dask": True, "vs_pyarrow": False, "flow_peak": True, "completed": False}
    assert summary["flow_peak_mib"] == 700.0 and summary["worker_peak_mib"] == 800.0


def test_data_file_keeps_the_other_size_and_the_report_compares_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = data / "data_scale.jsonl"
    data_scale.write_out(
        out, fixture_run("full", 32_000_000, "2026-12-01T10:00:00+00:00", worker=850.0), size="full"
    )
    old_quick = fixture_run("quick", 8_000_000, "2026-12-01T09:00:00+00:00", worker=10.0)
    data_scale.write_out(out, old_quick, size="quick")
    data_scale.write_out(
        out, fixture_run("quick", 8_000_000, "2026-12-03T10:00:00+00:00", worker=800.0), size="quick"
    )
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert {(x["size"], x["date"][:10]) for x in lines} == {("full", "2026-12-01"), ("quick", "2026-12-03")}

    assert data_scale.plot(lines, tmp_path / "data_scale.png").stat().st_size > 0
    text = render(data, tmp_path)
    assert "| quick: 8,000,000 rows, 1.01 GiB | full: 32,000,000 rows, 4.05 GiB |" in text
    assert "| ingest + shard / dask (median of per-rep ratios, range) | **1.15x** (1.10-1.20) |" in text
    assert "| ingest + shard vs pyarrow read + write | <= 2.0x | **not met** | **not met** |" in text
    assert "| every `mms run` completed | **no** | **no** |" in text
    assert "goal <= 1.10x: **met**, 850 / 800 MiB = 1.06x." in text  # the newest quick run, not the old one
    assert "**failed**: mms rep 2: exit status 1: boom" in text


def test_roles_from_command_lines() -> None:
    spawn = [
        "python",
        "-c",
        "from multiprocessing.spawn import spawn_main; spawn_main()",
        "--multiprocessing-fork",
    ]
    assert _scale_runs.role_of(spawn, parent_role="flow") == "dask_worker"
    assert _scale_runs.role_of(spawn, parent_role="dask_worker") == "other"  # a worker's own child
    assert (
        _scale_runs.role_of(["python", "-m", "infra.prefect_keeper", "--home", "h"], parent_role="flow")
        is None
    )
    tracker = ["python", "-c", "from multiprocessing.resource_tracker import main;main(8)"]
    assert _scale_runs.role_of(tracker, parent_role="flow") == "other"


def render(data: Path, tmp_path: Path) -> str:
    out = tmp_path / "RESULTS.md"
    report.main(["--data-dir", str(data), "--out", str(out), "--notes", str(tmp_path / "none.md")])
    text = out.read_text()
    start = text.index("## Data at scale")
    return text[start : text.index("\n## ", start + 1)]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_run_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = data / "data_scale.jsonl"
    cmd = [sys.executable, "-m", "bench.data_scale", "--rows", "20000", "--reps", "1", "--out", str(out)]
    subprocess.run([*cmd, "--tmp-dir", str(tmp_path)], cwd=REPO, check=True, timeout=840)

    lines = [json.loads(x) for x in out.read_text().splitlines()]
    for x in lines:
        assert x["bench"] == "data_scale" and x["size"] == "rows=20000" and x["rows"] == 20000
        assert x["machine"] and x["date"] and x["revision"] and x["command"]
    assert [x["kind"] for x in lines] == ["table", "run", "run", "run", "summary"]
    runs = {x["contender"]: x for x in lines if x["kind"] == "run"}
    assert set(runs) == {"mms", "dask", "pyarrow"}
    for name, run in runs.items():
        assert run["ok"], f"{name}: {run['error']}"
        assert (
            run["wall_s"] > 0 and run["work_s"] > 0 and run["tree_peak_mib"] > 0 and run["rows_out"] == 20000
        )
    mms = runs["mms"]
    assert (
        mms["ingest_s"] > 0 and mms["preprocess_and_shard_s"] > 0 and 0 < mms["window"][0] < mms["window"][1]
    )
    assert mms["work_s"] < mms["wall_s"] and 0 <= mms["accuracy"] <= 1
    assert mms["flow_peak_mib"] > 0 and mms["worker_peak_mib"] > 0
    roles = [p["role"] for p in mms["processes"]]
    assert roles.count("flow") == 1 and roles.count("dask_worker") >= 2  # the Prefect server left out
    assert all(len(p["t"]) == len(p["rss_mib"]) > 0 for p in mms["processes"])
    assert runs["dask"]["worker_peak_mib"] > 0 and runs["dask"]["cluster_start_s"] > 0
    summary = lines[-1]
    assert summary["completed"] is True
    assert all(math.isfinite(r["median"]) and r["median"] > 0 for r in summary["ratios"].values())

    text = render(data, tmp_path)
    assert "| rows=20000: 20,000 rows," in text and "| every `mms run` completed | yes |" in text
    assert not list(tmp_path.glob("mms-bench-data-scale-*"))  # the table and outputs are removed
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not left  # no Prefect server or Dask worker of the run outlives it
