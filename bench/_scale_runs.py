"""bench.data_scale's measuring and its summary: a contender run in its own session while its
process tree's RSS is sampled, and the summary line of a run's reps (medians, per-rep ratios of
``work_s``, peaks, the goals). The module docstring of bench.data_scale says what is measured and
how processes get their roles.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.2
MIB = 2**20
CONTENDERS = ("mms", "dask", "pyarrow")  # bench.data_scale.RUNNERS' keys, in the summary's order
# Goals (issue 13): work_s ratios, the flow process's peak, worker peak growth from 1 GiB to 4 GiB.
GOALS = {"vs_dask": 1.2, "vs_pyarrow": 2.0, "flow_peak_mib": 1024.0, "worker_growth": 1.10}


# ---- running a contender and sampling its memory -------------------------------------------------
@dataclass
class Tracked:
    """One process seen while sampling: its role and RSS series (seconds since spawn, MiB)."""

    pid: int
    role: str
    cmd: str
    t: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)

    def as_json(self) -> dict:
        peak = max(self.rss_mib, default=0.0)
        return {"pid": self.pid, "role": self.role, "cmd": self.cmd, "peak_rss_mib": peak} | {
            "t": self.t, "rss_mib": self.rss_mib,
        }  # fmt: skip


def role_of(cmdline: list[str], *, parent_role: str) -> str | None:
    """What a descendant is, from its command line; None for the embedded Prefect server's tree."""
    text = " ".join(cmdline)
    if "infra.prefect_keeper" in text:
        return None
    if parent_role in ("flow", "main") and "spawn_main" in text:  # multiprocessing spawn: a Dask worker
        return "dask_worker"
    return "other"


def _walk(root, root_role: str) -> list[tuple[object, str]]:
    """The root and its descendants with their roles, the Prefect server's subtree left out."""
    import psutil

    out, todo = [], [(root, root_role)]
    while todo:
        proc, role = todo.pop()
        out.append((proc, role))
        for child in proc.children():
            try:
                child_role = role_of(child.cmdline(), parent_role=role)
            except psutil.Error:
                continue
            if child_role is not None:
                todo.append((child, child_role))
    return out


def sample(root, *, root_role: str, t: float, seen: dict[tuple[int, float], Tracked]) -> float:
    """One sample of every process of the tree into ``seen``; the tree's total RSS in MiB."""
    import psutil

    total = 0.0
    with contextlib.suppress(psutil.Error):
        for proc, role in _walk(root, root_role):
            try:
                key = (proc.pid, proc.create_time())
                rss = proc.memory_info().rss / MIB
                if key not in seen:
                    seen[key] = Tracked(pid=proc.pid, role=role, cmd=" ".join(proc.cmdline())[:160])
            except psutil.Error:
                continue
            seen[key].t.append(round(t, 2))
            seen[key].rss_mib.append(round(rss, 1))
            total += rss
    return total


def run_sampled(cmd: list[str], *, env: dict[str, str], root_role: str, logs: Path, timeout_s: float) -> dict:
    """Run ``cmd`` (own session, output to files under ``logs``) while sampling its tree's RSS."""
    import psutil

    logs.mkdir(parents=True, exist_ok=True)
    seen: dict[tuple[int, float], Tracked] = {}
    tree_peak, t0_unix, t0 = 0.0, time.time(), time.perf_counter()
    with (logs / "stdout").open("w") as out, (logs / "stderr").open("w") as err:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )
        try:
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                if time.perf_counter() - t0 > timeout_s:
                    raise TimeoutError(f"{cmd[:4]} ran past {timeout_s:g} s")
                t = time.perf_counter() - t0
                tree_peak = max(tree_peak, sample(root, root_role=root_role, t=t, seen=seen))
                time.sleep(SAMPLE_S)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of its session is left (not the server)
            proc.wait()
    wall = time.perf_counter() - t0
    stderr = (logs / "stderr").read_text(errors="replace").strip().splitlines()
    return {
        "rc": proc.returncode, "wall_s": round(wall, 2), "t0_unix": t0_unix,
        "stdout": (logs / "stdout").read_text(errors="replace"), "stderr_tail": stderr[-5:],
        "tree_peak_mib": round(tree_peak, 1), "processes": [p.as_json() for p in seen.values()],
    }  # fmt: skip


def child_env(**extra: str) -> dict[str, str]:
    """This environment without MMS_/PREFECT_/MLFLOW_ settings (nothing leaks in), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMS_", "PREFECT_", "MLFLOW_"))}
    return env | {"PYTHONPATH": str(REPO)} | extra


def peak(run: dict, role: str, window: tuple[float, float] | None = None) -> float | None:
    """The highest RSS (MiB) of any process of ``role``, within ``window`` (seconds) if given."""
    values = [
        r
        for p in run["processes"]
        if p["role"] == role
        for t, r in zip(p["t"], p["rss_mib"], strict=True)
        if window is None or window[0] <= t <= window[1]
    ]
    return max(values, default=None)


# ---- the summary of a run's reps -----------------------------------------------------------------
def ratio_stats(values: list[float]) -> dict:
    """Median and range of per-rep ratios (the headline is the median, not a ratio of medians)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    rounded = [round(v, 3) for v in values]
    return {"median": round(statistics.median(values), 3), "min": min(rounded), "max": max(rounded)} | {
        "n": len(values), "values": rounded,
    }  # fmt: skip


def summarize(runs: list[dict]) -> dict:
    """Medians per contender, per-rep ratios of work_s, the peaks, and the goals of this run."""
    ok = {(r["rep"], r["contender"]): r for r in runs if r["ok"] and r.get("work_s")}

    def med(contender: str, key: str, nd: int = 2) -> float | None:
        values = [r[key] for (_, c), r in ok.items() if c == contender and r.get(key) is not None]
        return round(statistics.median(values), nd) if values else None

    def most(contender: str, key: str) -> float | None:
        values = [r[key] for r in runs if r["contender"] == contender and r.get(key) is not None]
        return max(values, default=None)

    mine = {i: r["work_s"] for (i, c), r in ok.items() if c == "mms"}
    # vs_dask: its cluster's start included, as the flow's ingest waits for its own cluster's start
    pairs = {"vs_dask": ("dask", "work_s"), "vs_dask_compute": ("dask", "compute_s")}
    pairs["vs_pyarrow"] = ("pyarrow", "work_s")
    ratios = {
        name: ratio_stats([mine[i] / ok[(i, b)][k] for i in sorted(mine) if (i, b) in ok])
        for name, (b, k) in pairs.items()
    }
    mms_runs = [r for r in runs if r["contender"] == "mms"]
    line = {"kind": "summary", "reps": len({r["rep"] for r in runs})}
    line["completed"] = bool(mms_runs) and all(r["ok"] for r in mms_runs)
    line |= {f"{c}_{k}": med(c, k) for c in CONTENDERS for k in ("work_s", "wall_s")}
    line |= {"mms_ingest_s": med("mms", "ingest_s"), "mms_shard_s": med("mms", "preprocess_and_shard_s")}
    line |= {f"dask_{k}": med("dask", k) for k in ("cluster_start_s", "compute_s")} | {"ratios": ratios}
    line |= {
        "flow_peak_mib": most("mms", "flow_peak_mib"),
        "flow_peak_ingest_shard_mib": most("mms", "flow_peak_ingest_shard_mib"),
        "worker_peak_mib": most("mms", "worker_peak_mib"),
        "worker_peak_ingest_shard_mib": most("mms", "worker_peak_ingest_shard_mib"),
        "dask_tree_peak_mib": most("dask", "tree_peak_mib"),
        "pyarrow_peak_mib": most("pyarrow", "main_peak_mib"),
        "accuracy": med("mms", "accuracy", 4),
        "errors": [f"{r['contender']} rep {r['rep']}: {r['error']}" for r in runs if not r["ok"]],
    }
    return line | {"goals": GOALS, "meets": meets(line)}


def meets(s: dict) -> dict[str, bool | None]:
    """This run's goals (the worker-growth goal needs two sizes: bench.report checks it)."""
    at = lambda x, goal: None if x is None else x <= goal  # noqa: E731
    return {
        "vs_dask": at(s["ratios"]["vs_dask"]["median"], GOALS["vs_dask"]),
        "vs_pyarrow": at(s["ratios"]["vs_pyarrow"]["median"], GOALS["vs_pyarrow"]),
        "flow_peak": None if s["flow_peak_mib"] is None else s["flow_peak_mib"] < GOALS["flow_peak_mib"],
        "completed": s["completed"],
    }
