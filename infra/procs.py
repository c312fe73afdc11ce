"""Process and port helpers shared by the local stack (infra.stack) and the embedded Prefect server
(infra.embedded_prefect): loopback probes, file locks, and stopping exactly the processes we started.
Imports nothing heavy: the CLI loads these at start-up."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PROBE_TIMEOUT_S = 2.0
# Bypass any http_proxy in the environment: every probe goes to loopback.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def bind_port(port: int) -> int | None:
    """Bind 127.0.0.1:port and let go; the port bound, or None when it is taken."""
    with socket.socket() as s:
        # Same option the servers use, so a TIME_WAIT leftover does not count as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return None
        return s.getsockname()[1]


def http_ok(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when a GET of ``url`` answers 200 within ``timeout_s``."""
    try:
        with _HTTP.open(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:
        return False


def tcp_ok(port: int, ping: bytes = b"", pong: bytes = b"") -> bool:
    """True when 127.0.0.1:port accepts a connection (and answers ``ping`` with ``pong``)."""
    try:
        with socket.create_connection((HOST, port), timeout=PROBE_TIMEOUT_S) as s:
            if ping:
                s.sendall(ping)
            return s.recv(64).startswith(pong) if pong else True
    except OSError:
        return False


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created with its folder if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cmdline_matches(cmdline: list[str], command: list[str]) -> bool:
    """True when a process's ``cmdline`` runs ``command``. A script runs as `python /venv/bin/prefect
    ...`: compare the argument tail and the program name."""
    tail = command[1:]
    if len(cmdline) < len(command) or (tail and cmdline[-len(tail) :] != tail):
        return False
    head = cmdline[: len(cmdline) - len(tail)]
    return any(Path(arg).name == Path(command[0]).name for arg in head)


def same_process(pid: int, create_time: float) -> psutil.Process | None:
    """The live process ``pid`` if it was created at ``create_time`` (not a recycled pid), else None."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or abs(proc.create_time() - create_time) > 0.5:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def terminate(proc: psutil.Process, timeout_s: float) -> None:
    """SIGTERM the process group, then SIGKILL whatever of it is left after `timeout_s`."""
    try:
        family = [proc, *proc.children(recursive=True)]
        own_group = os.getpgid(proc.pid) == proc.pid  # started with start_new_session=True
    except (psutil.NoSuchProcess, ProcessLookupError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if own_group:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        for p in family:
            # One signal each: the group signal already reached its members (a second SIGTERM
            # turns uvicorn's graceful shutdown into a forced one).
            with suppress(psutil.NoSuchProcess, ProcessLookupError):
                if not own_group or os.getpgid(p.pid) != proc.pid:
                    p.send_signal(sig)
        # wait_procs also reaps our own children, so no zombie keeps the pid alive.
        _, family = psutil.wait_procs(family, timeout=timeout_s if sig == signal.SIGTERM else 5)
        if not family:
            return
    log.warning("processes %s survived SIGKILL", [p.pid for p in family])
