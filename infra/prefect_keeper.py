"""The process behind the embedded Prefect server of one MMS_HOME (see infra.embedded_prefect).

    python -m infra.prefect_keeper --home H --port P --idle-s N

Serves the same app as Prefect's own temporary server (``create_app(ephemeral=True)``: API only,
the services a temporary server runs) with uvicorn in this process, on 127.0.0.1:P, and keeps
it for the next `mms` command instead of paying Prefect's start (and, in a new home, its
database migrations) on every run. It stops by itself once no process has held a lease for
``--idle-s`` seconds, when its home is deleted, or when the state file names another server;
SIGTERM stops it at once (`mms stack down`).

A lease is a file ``leases/<pid>-<create time>`` beside the state file, made by the client
that uses the server and removed when it is done; a lease whose process is gone counts as
released, so a killed client never pins the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

import psutil

EXIT_PORT_TAKEN = 3  # the client picked a port that someone took before we bound it
CHECK_EVERY_S = 1.0


def server_dir(home: Path) -> Path:
    """Where the embedded server keeps its state file, leases and log."""
    return home / "prefect" / "embedded"


def lease_name(proc: psutil.Process) -> str:
    """The lease file name of ``proc``: ``<pid>-<create time in ms>``, so a recycled pid is no lease."""
    return f"{proc.pid}-{round(proc.create_time() * 1000)}"


def lease_alive(path: Path) -> bool:
    """True when the lease's process (``<pid>-<create time in ms>``) still runs."""
    try:
        pid, ms = (int(x) for x in path.name.split("-"))
        return abs(psutil.Process(pid).create_time() * 1000 - ms) < 500
    except (ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def live_leases(directory: Path) -> int:
    """Count the leases whose process still runs; remove the others."""
    live = 0
    for path in (directory / "leases").glob("*"):
        if lease_alive(path):
            live += 1
        else:
            path.unlink(missing_ok=True)
    return live


def _still_ours(directory: Path) -> bool:
    try:
        return json.loads((directory / "server.json").read_text())["pid"] == os.getpid()
    except (OSError, ValueError, KeyError):
        return False


async def _watch_idle(server, directory: Path, idle_s: float) -> None:
    """Ask uvicorn to exit once nobody has held a lease for ``idle_s`` (or the home is gone)."""
    last_used = time.monotonic()
    while not server.should_exit:
        await asyncio.sleep(CHECK_EVERY_S)
        if not directory.exists() or not _still_ours(directory):
            server.should_exit = True
        elif live_leases(directory):
            last_used = time.monotonic()
        elif time.monotonic() - last_used >= idle_s:
            print(f"no lease for {idle_s:.0f} s: stopping", flush=True)
            server.should_exit = True


async def _serve(sock: socket.socket, directory: Path, idle_s: float) -> None:
    import uvicorn
    from prefect.server.api.server import create_app

    config = uvicorn.Config(create_app(ephemeral=True, final=True), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    watcher = asyncio.create_task(_watch_idle(server, directory, idle_s))
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-s", type=float, required=True)
    args = parser.parse_args(argv)
    directory = server_dir(args.home)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        # Bound but not listening until the app is ready: clients polling /api/health are refused
        # at once instead of queueing behind Prefect's imports and migrations.
        sock.bind(("127.0.0.1", args.port))
    except OSError as exc:
        print(f"cannot bind 127.0.0.1:{args.port}: {exc}", file=sys.stderr, flush=True)
        return EXIT_PORT_TAKEN
    t0 = time.monotonic()
    try:
        asyncio.run(_serve(sock, directory, args.idle_s))
    finally:
        if _still_ours(directory):
            (directory / "server.json").unlink(missing_ok=True)
    print(f"stopped after {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
