"""The embedded Prefect server: one per MMS_HOME, started on first use, kept while it is used.

Prefect's own temporary server starts anew in every process that runs a flow without
PREFECT_API_URL: ~5 s on 2 cores, ~11 s in a new home (database migrations), more on a busy
machine, and it fails the run once it takes longer than its 20 s default. Instead `mms` commands
lease the home's embedded server (infra.prefect_keeper, a process of its own):

    lease = acquire(home=..., idle_s=...)     # finds it, or spawns it; returns at once
    os.environ["PREFECT_API_URL"] = lease.api_url   # before prefect is imported
    ...heavy imports, MLflow store...         # overlap with the server's start
    lease.wait_ready(timeout_s=...)           # waits; one retry; then an error that says the fix
    lease.release()                           # the server stops after idle_s without leases

`stop(home=...)` (`mms stack down`) stops it at once. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from infra.prefect_keeper import EXIT_PORT_TAKEN, lease_name, server_dir
from infra.procs import HOST, bind_port, http_ok, locked, same_process, terminate
from mms_core.errors import MMSError

KEEPER_MODULE = "infra.prefect_keeper"
_POLL_S = 0.1


class EmbeddedServerError(MMSError):
    """The embedded Prefect server did not come up; the message names the setting, the log and the fix."""


@dataclass(frozen=True)
class ServerRecord:
    """What server.json says about the home's server process."""

    pid: int
    create_time: float
    port: int

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"


@dataclass
class Lease:
    """A hold on the embedded server of ``home``: it is not stopped for idleness while held."""

    home: Path
    server: ServerRecord
    path: Path
    idle_s: float

    @property
    def api_url(self) -> str:
        return self.server.api_url

    @property
    def log(self) -> Path:
        return server_dir(self.home) / "server.log"

    def wait_ready(self, *, timeout_s: float) -> str:
        """Wait until the server answers its health check; return its API URL.

        A server that dies or is not ready within ``timeout_s`` is stopped and started once more
        on the same port (PREFECT_API_URL is already fixed in this process).

        Raises:
            EmbeddedServerError: The second start failed too.
        """
        for attempt in (1, 2):
            why = _wait_healthy(self.server, timeout_s=timeout_s)
            if why is None:
                return self.api_url
            with locked(server_dir(self.home) / ".lock"):
                _stop_record(self.server)
                if attempt == 1:
                    self.server = _spawn(self.home, port=self.server.port, idle_s=self.idle_s)
        raise EmbeddedServerError(
            f"the embedded Prefect server {why} twice (MMS_PREFECT_START_TIMEOUT_S={timeout_s:g}). "
            f"Its log: {self.log}\n{_tail(self.log)}\n"
            "Fix: on a slow or busy machine raise MMS_PREFECT_START_TIMEOUT_S, or start the servers "
            "once with `mms stack up` (later `mms` commands use them)."
        )

    def release(self) -> None:
        """Give the lease back (idempotent); the server stops after ``idle_s`` without leases."""
        self.path.unlink(missing_ok=True)


def acquire(*, home: Path, idle_s: float) -> Lease:
    """Lease the embedded server of ``home``, spawning it if none runs. Returns without waiting
    for it to be ready (see Lease.wait_ready), so that its start overlaps the caller's own."""
    directory = server_dir(home)
    with locked(directory / ".lock"):
        record = _live_record(home)
        if record is None:
            record = _spawn(home, port=_free_port(), idle_s=idle_s)
        path = directory / "leases" / lease_name(psutil.Process())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()  # under the lock: the server cannot decide it is idle between the check and this
    return Lease(home=home, server=record, path=path, idle_s=idle_s)


def status(*, home: Path) -> ServerRecord | None:
    """The running embedded server of ``home``, or None."""
    return _live_record(home)


def stop(*, home: Path, timeout_s: float = 10) -> bool:
    """Stop the embedded server of ``home`` now, leases or not; True when one was running."""
    with locked(server_dir(home) / ".lock"):
        record = _live_record(home)
        if record is None:
            return False
        _stop_record(record, timeout_s=timeout_s)
        return True


def _free_port() -> int:
    port = bind_port(0)
    assert port is not None  # port 0 always binds
    return port


def _read_record(home: Path) -> ServerRecord | None:
    try:
        data = json.loads((server_dir(home) / "server.json").read_text())
        pid, port = int(data["pid"]), int(data["port"])
        return ServerRecord(pid=pid, create_time=float(data["create_time"]), port=port)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_record(home: Path, record: ServerRecord) -> None:
    directory = server_dir(home)
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".server.", delete=False) as tmp:
        json.dump({"pid": record.pid, "create_time": record.create_time, "port": record.port}, tmp)
    os.replace(tmp.name, directory / "server.json")


def _owned(record: ServerRecord) -> psutil.Process | None:
    proc = same_process(record.pid, record.create_time)
    try:
        return proc if proc is not None and KEEPER_MODULE in proc.cmdline() else None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _live_record(home: Path) -> ServerRecord | None:
    record = _read_record(home)
    return record if record is not None and _owned(record) is not None else None


def _spawn(home: Path, *, port: int, idle_s: float) -> ServerRecord:
    """Start the keeper process (own session, output to server.log) and record it; the caller holds
    the lock. The keeper inherits this environment plus Prefect's settings for ``home``."""
    directory = server_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    command = [sys.executable, "-m", KEEPER_MODULE, "--home", str(home), "--port", str(port), "--idle-s",
               str(idle_s)]  # fmt: skip
    with open(directory / "server.log", "ab") as out:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=env, cwd=str(Path(__file__).resolve().parents[1]), start_new_session=True,
        )  # fmt: skip
    record = ServerRecord(pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(), port=port)
    _write_record(home, record)
    return record


def _wait_healthy(record: ServerRecord, *, timeout_s: float) -> str | None:
    """None once the server answers; else why not ("exited with code N", "was not ready in T s")."""
    deadline = time.monotonic() + timeout_s
    url = f"{record.api_url}/health"
    while True:
        if _owned(record) is None:
            code = _exit_code(record.pid)
            return f"could not bind port {record.port}" if code == EXIT_PORT_TAKEN else f"exited ({code})"
        if http_ok(url, timeout_s=min(5.0, max(0.5, deadline - time.monotonic()))):
            return None
        if time.monotonic() > deadline:
            return f"was not ready within {timeout_s:g} s"
        time.sleep(_POLL_S)


def _exit_code(pid: int) -> int | str:
    """The exit code of our own child ``pid`` (reaping it), or why it is unknown."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return "exit code unknown: another process started it"
    return os.waitstatus_to_exitcode(status) if done else "still running, but not the server we started"


def _stop_record(record: ServerRecord, timeout_s: float = 10) -> None:
    proc = _owned(record)
    if proc is not None:
        terminate(proc, timeout_s)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "    (no log)"
    return "\n".join(f"    {line}" for line in text)
