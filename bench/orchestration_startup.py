"""Orchestration start-up under load: our embedded Prefect server vs Prefect's temporary server.

Starts the orchestration as a user's `mms` command does, with both cores busy: the embedded Prefect
server of MMS_HOME (issue 11) vs Prefect's own temporary server, as before it.

    python -m bench.orchestration_startup [--starts N] [--baseline-starts M] [--no-hog]

A CPU hog (2 pure-Python spinning processes, nice 0) runs for the whole measurement. One start is
a fresh Python process (``--client MODE --home H``, this module) that sets MMS_HOME and Prefect's
environment, chooses the server as the CLI does, and runs a one-task flow; it reports seconds from
its own process start to the server being ready and to the flow being done; the parent times it
from spawn to exit. Modes, alternated start by start (ABCDE ABCDE ...; the baseline's M starts
spread evenly over the N rounds):

- ours_fresh: ``use_servers`` + ``Servers.ready`` in a new home (server spawned, DB migrated)
- ours_reused_stopped: the same home each time, its server stopped before each start (DB exists)
- ours_reused_running: the same home, its server left running (a second `mms run` attaches)
- baseline_fresh / baseline_reused: no ``use_servers``, no PREFECT_API_URL and Prefect's default
  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (20 s): Prefect's SubprocessASGIServer

Prints one JSON line per start (warm-ups of the reused homes have round 0) and one summary line
per mode (``"summary": true``): N, failures and the first error, p50/max of the times, and for
ours the median of the per-round ratios ours/baseline with their range. Every server it started
is stopped and every temporary home removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOG_PROCESSES = 2
# Spins until its parent (this benchmark) is gone, so a killed benchmark never leaves it running.
HOG_CODE = "import os\np = os.getppid()\nwhile os.getppid() == p:\n    for _ in range(10**6):\n        pass\n"
CLIENT_TIMEOUT_S = 600.0  # above ours' worst case: 2 x MMS_PREFECT_START_TIMEOUT_S (180 s)
TIMEOUT_KEY = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


@dataclass(frozen=True)
class Mode:
    """One way of starting: whose server, and which home."""

    name: str
    ours: bool
    fresh: bool
    keep_running: bool = False  # ours, reused home: leave its server up between starts
    vs: str | None = None  # the baseline mode its ratios are taken against


MODES = (
    Mode("ours_fresh", ours=True, fresh=True, vs="baseline_fresh"),
    Mode("ours_reused_stopped", ours=True, fresh=False, vs="baseline_reused"),
    Mode("ours_reused_running", ours=True, fresh=False, keep_running=True, vs="baseline_reused"),
    Mode("baseline_fresh", ours=False, fresh=True),
    Mode("baseline_reused", ours=False, fresh=False),
)
BY_NAME = {m.name: m for m in MODES}


# ---- the client: one start, in its own process ---------------------------------------------------
def _process_age_s() -> float:
    """Seconds since this process started (kernel start time, boot clock: interpreter start counts)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_s


def client_main(*, mode: str, home: Path) -> int:
    """One start: choose the server as `mms` does, wait for it, run a one-task flow; print a JSON line.

    Args:
        mode: A name in MODES; ours uses ``use_servers``, the baseline Prefect's temporary server.
        home: The MMS_HOME of this start.

    Returns:
        The exit status: 0 when the flow ran, 1 otherwise.
    """
    t0 = time.monotonic() - _process_age_s()
    out: dict = {"client_result": True, "mode": mode, "seconds": {}}
    try:
        os.environ["MMS_HOME"] = str(home)
        if BY_NAME[mode].ours:
            from mms_cli.common import settings_from_env, use_servers

            settings = settings_from_env()
            servers = use_servers(settings)  # spawns or finds the server; returns at once
            out["server_mode"] = servers.mode
        else:
            from mms_core.config import Settings, prefect_env

            settings, servers = Settings(), None
            # The old behaviour: Prefect's own 20 s default, which prefect_env now raises.
            os.environ.update({k: v for k, v in prefect_env(settings).items() if k != TIMEOUT_KEY})
        from prefect import flow, task

        out["seconds"]["prefect_imported"] = round(time.monotonic() - t0, 3)

        @task
        def one() -> int:
            return 1

        @flow(name="bench-startup")
        def trivial() -> int:
            return one()

        if servers is not None:
            servers.ready(settings)
            running = servers.running()
        else:
            from prefect.client.orchestration import get_client

            get_client(sync_client=True)  # starts SubprocessASGIServer, as the flow's first call would
            running = contextlib.nullcontext()
        out["seconds"]["ready"] = round(time.monotonic() - t0, 3)
        with running:
            if trivial() != 1:
                raise RuntimeError("the flow returned a wrong result")
        out["seconds"]["flow_done"] = round(time.monotonic() - t0, 3)
        out["ok"] = True
    except BaseException as exc:  # the parent records any failure, Ctrl-C included
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


# ---- the parent: hog, homes, alternation -----------------------------------------------------------
def start_hog(*, processes: int, into: list[subprocess.Popen]) -> None:
    """Start ``processes`` pure-Python spinners at this process's nice value (0: real competition).

    Appends each to ``into`` as it starts, so that a failure half-way still stops the others.
    """
    for _ in range(processes):
        into.append(subprocess.Popen([sys.executable, "-c", HOG_CODE], stdin=subprocess.DEVNULL))


def stop_hog(hog: list[subprocess.Popen]) -> float:
    """Kill the spinners; the CPU seconds they used (psutil, before the kill)."""
    import psutil

    used = 0.0
    for proc in hog:
        try:
            times = psutil.Process(proc.pid).cpu_times()
            used += times.user + times.system
        except psutil.Error:
            pass
        proc.kill()
        proc.wait()
    return used


def client_env(*, home: Path) -> dict[str, str]:
    """The parent's environment without any PREFECT_* or MMS_* variable, plus MMS_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMS_", "PREFECT_"))}
    return env | {"MMS_HOME": str(home)}


def run_client(*, mode: Mode, home: Path, timeout_s: float) -> dict:
    """Spawn one client and wait; its JSON result plus the wall seconds from spawn to exit.

    The client runs in its own process group, killed whole on a timeout or Ctrl-C (the baseline's
    uvicorn child is in it; our embedded server has its own session and is stopped by home).
    """
    cmd = [sys.executable, "-m", "bench.orchestration_startup", "--client", mode.name, "--home", str(home)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=client_env(home=home), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except BaseException as exc:  # a timeout, Ctrl-C or SIGTERM: nothing of this client may survive
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        if not isinstance(exc, subprocess.TimeoutExpired):
            raise
    wall = round(time.perf_counter() - t0, 3)
    results = [r for line in stdout.splitlines() if (r := _json(line)).get("client_result")]
    result = results[-1] if results else None
    if result is None:
        last = [x for x in stderr.splitlines() if x.strip()][-1:] or [f"exit status {proc.returncode}"]
        why = f"killed after {timeout_s:g} s" if proc.returncode == -signal.SIGKILL else last[0][:300]
        result = {"ok": False, "error": f"no result: {why}", "seconds": {}}
    result["seconds"]["wall"] = wall
    return result


def _json(line: str) -> dict:
    if not line.startswith("{"):
        return {}
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def spread(*, count: int, rounds: int) -> set[int]:
    """The ``count`` rounds (1-based) out of ``rounds`` spread evenly, the last one included."""
    return {r for r in range(1, rounds + 1) if r * count // rounds > (r - 1) * count // rounds}


@dataclass
class Homes:
    """The temporary homes of one run: a root, one reused home per reused mode, and the fresh ones."""

    root: Path

    def reused(self, mode: Mode) -> Path:
        return self.root / mode.name

    def fresh(self, mode: Mode, round_: int) -> Path:
        return self.root / f"{mode.name}-{round_}"

    def stop_all(self) -> None:
        """Stop every embedded server under the root, then remove the root."""
        from infra.embedded_prefect import stop

        for home in self.root.iterdir() if self.root.exists() else ():
            if home.is_dir():
                stop(home=home)
        shutil.rmtree(self.root, ignore_errors=True)


def one_start(*, mode: Mode, round_: int, homes: Homes, timeout_s: float) -> dict:
    """One start of ``mode`` in round ``round_`` (0: the warm-up of a reused home)."""
    from infra.embedded_prefect import status, stop

    home = homes.fresh(mode, round_) if mode.fresh else homes.reused(mode)
    if mode.ours and not mode.keep_running:
        stop(home=home)
    line: dict = {"mode": mode.name, "round": round_}
    if mode.ours:
        line["server_was_running"] = status(home=home) is not None
    result = run_client(mode=mode, home=home, timeout_s=timeout_s)
    if mode.ours and not mode.keep_running:
        stop(home=home)  # an idle server of another mode would add load to the next starts
    if mode.fresh:
        shutil.rmtree(home, ignore_errors=True)
    line |= {"seconds": result["seconds"], "ok": result["ok"], "error": result.get("error")}
    return line | ({"server_mode": result["server_mode"]} if "server_mode" in result else {})


def _stats(values: list[float]) -> dict:
    return {"p50": round(statistics.median(values), 3), "max": round(max(values), 3)} if values else {}


def summarize(*, mode: Mode, starts: list[dict]) -> dict:
    """The summary line of ``mode``: N, failures, first error, p50/max of each time, ratios vs baseline."""
    mine = [s for s in starts if s["mode"] == mode.name and s["round"] > 0]
    ok = [s for s in mine if s["ok"]]
    failed = [s for s in mine if not s["ok"]]
    line = {"summary": True, "mode": mode.name, "ours": mode.ours, "fresh_home": mode.fresh}
    line |= {"n": len(mine), "failures": len(failed), "first_error": failed[0]["error"] if failed else None}
    for key in ("ready", "flow_done", "wall"):
        line[key] = _stats([s["seconds"][key] for s in ok if key in s["seconds"]])
    if mode.vs:
        line["vs"] = mode.vs
        for key in ("ready", "flow_done"):
            line[f"ratio_{key}"] = pair_ratios(starts=starts, a=mode.name, b=mode.vs, key=key)
    return line


def pair_ratios(*, starts: list[dict], a: str, b: str, key: str) -> dict:
    """Per round where both ``a`` and ``b`` succeeded, a/b of ``key``: median, range and count."""
    ok = {(s["mode"], s["round"]): s["seconds"][key] for s in starts if s["ok"] and s["round"] > 0}
    ratios = [ok[(a, r)] / ok[(b, r)] for (m, r) in ok if m == a and (b, r) in ok and ok[(b, r)] > 0]
    if not ratios:
        return {"pairs": 0}
    median, low, high = statistics.median(ratios), min(ratios), max(ratios)
    return {"median": round(median, 3), "min": round(low, 3), "max": round(high, 3), "pairs": len(ratios)}


def measure(*, starts: int, baseline_starts: int, homes: Homes, stamp: dict, timeout_s: float) -> list[dict]:
    """Warm the reused homes, then the rounds (ABCDE ABCDE ...); prints each start's line."""
    rounds = max(starts, baseline_starts)
    when = {True: spread(count=starts, rounds=rounds), False: spread(count=baseline_starts, rounds=rounds)}
    done = []
    for mode in (m for m in MODES if not m.fresh and (starts if m.ours else baseline_starts)):
        line = one_start(mode=mode, round_=0, homes=homes, timeout_s=timeout_s)  # the DB exists from here on
        print(json.dumps(stamp | line | {"warmup": True}), flush=True)
    for round_ in range(1, rounds + 1):
        for mode in (m for m in MODES if round_ in when[m.ours]):
            line = stamp | one_start(mode=mode, round_=round_, homes=homes, timeout_s=timeout_s)
            print(json.dumps(line), flush=True)
            done.append(line)
    return done


def reap_strays(*, root: Path) -> int:
    """Kill any process still naming ``root`` in its command line or PREFECT_HOME (ours only); the count."""
    import psutil

    found = 0
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            named = str(root) in " ".join(proc.info["cmdline"] or [])
            named = named or proc.environ().get("PREFECT_HOME", "").startswith(str(root))
            if named and proc.pid != os.getpid():
                proc.kill()
                found += 1
        except psutil.Error:
            continue
    return found


def run_stamp(*, hog_processes: int) -> dict:
    """What every line of this run carries: the machine, the run's date (the report's run key), the hog."""
    return {
        "bench": "orchestration_startup",
        "machine": f"{platform.platform()} nproc={len(os.sched_getaffinity(0))}",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hog_processes": hog_processes,
    }


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that the finally blocks stop the hog, the clients and the servers


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``--client`` runs one start; see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=20, help="Starts of each of our modes.")
    parser.add_argument(
        "--baseline-starts", type=int, help="Starts of each baseline mode (default: --starts)."
    )
    parser.add_argument("--no-hog", action="store_true", help="No CPU hog (debugging).")
    parser.add_argument("--timeout-s", type=float, default=CLIENT_TIMEOUT_S, help="Kill a start after this.")
    parser.add_argument("--client", choices=list(BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return client_main(mode=args.client, home=args.home)
    baseline_starts = args.starts if args.baseline_starts is None else args.baseline_starts
    if args.starts < 1 or baseline_starts < 0:
        parser.error("--starts must be >= 1 and --baseline-starts >= 0")
    signal.signal(signal.SIGTERM, _sigterm)
    hog_n = 0 if args.no_hog else HOG_PROCESSES
    stamp = run_stamp(hog_processes=hog_n)
    homes = Homes(root=Path(tempfile.mkdtemp(prefix="mms-bench-startup-")))
    hog: list[subprocess.Popen] = []
    t0 = time.perf_counter()
    try:
        start_hog(processes=hog_n, into=hog)
        starts = measure(
            starts=args.starts,
            baseline_starts=baseline_starts,
            homes=homes,
            stamp=stamp,
            timeout_s=args.timeout_s,
        )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: clean up (below), print no summary
        print("orchestration_startup: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        hog_cpu_s, elapsed = stop_hog(hog), time.perf_counter() - t0
        homes.stop_all()
        if strays := reap_strays(root=homes.root):
            print(f"orchestration_startup: killed {strays} leftover process(es)", file=sys.stderr)
    extra = {"elapsed_s": round(elapsed, 1), "hog_cores": round(hog_cpu_s / elapsed, 2)}
    extra["nice"] = os.getpriority(os.PRIO_PROCESS, 0)  # the hog's too: it inherits it
    for mode in MODES:
        print(json.dumps(stamp | summarize(mode=mode, starts=starts) | extra), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
