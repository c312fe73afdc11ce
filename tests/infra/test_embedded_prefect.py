"""The embedded Prefect server of an MMS_HOME (infra.embedded_prefect + infra.prefect_keeper), real
processes on 127.0.0.1: clients in their own processes share one server, a stale record is replaced,
a killed client does not pin it, it stops by itself when idle, and a start that cannot succeed is
retried once and then named with its setting, log and fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from infra import embedded_prefect
from infra.prefect_keeper import server_dir

REPO = Path(__file__).resolve().parents[2]

# A client as an `mms` command is one: lease, point Prefect at it, wait, run a flow, hold, let go.
CLIENT = """
import json, os, sys, time
from pathlib import Path
from infra.embedded_prefect import acquire

def main():
    home, hold_s = Path(sys.argv[1]), float(sys.argv[2])
    lease = acquire(home=home, idle_s=float(sys.argv[3]))
    os.environ["PREFECT_API_URL"] = lease.api_url
    lease.wait_ready(timeout_s=180)
    from prefect import flow

    @flow
    def hello() -> int:
        return 42

    print(json.dumps({"pid": lease.server.pid, "api": lease.api_url, "result": hello()}), flush=True)
    time.sleep(hold_s)
    lease.release()

if __name__ == "__main__":
    main()
"""


def _client(home: Path, *, hold_s: float, idle_s: float) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMS_", "PREFECT_"))}
    env |= {"PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(home), str(hold_s), str(idle_s)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _report(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    assert line, proc.stderr.read()[-3000:]
    return json.loads(line)


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.2)
    return False


def test_clients_share_one_server_that_outlives_a_killed_client_and_stops_when_idle(tmp_path):
    # A record left by a server that died (here: a process that has exited) is replaced.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    server_dir(tmp_path).mkdir(parents=True)
    stale = {"pid": dead.pid, "create_time": 1.0, "port": 1}
    (server_dir(tmp_path) / "server.json").write_text(json.dumps(stale))

    first = _client(tmp_path, hold_s=8, idle_s=2)
    second = _client(tmp_path, hold_s=600, idle_s=2)  # killed below: it never releases its lease
    a, b = _report(first), _report(second)
    try:
        assert a["result"] == b["result"] == 42
        assert a["pid"] == b["pid"] != dead.pid and a["api"] == b["api"]
        assert a["api"].startswith("http://127.0.0.1:")
        assert embedded_prefect.status(home=tmp_path).pid == a["pid"]
        assert len(list((server_dir(tmp_path) / "leases").iterdir())) == 2
        second.send_signal(signal.SIGKILL)
        second.wait()
        assert first.wait(timeout=60) == 0
        # Both clients are gone (one released, one was killed): after idle_s the server stops itself.
        assert _gone(a["pid"], timeout_s=30), "the embedded server did not stop once idle"
    finally:
        for proc in (first, second):
            proc.kill()
        embedded_prefect.stop(home=tmp_path)
    assert not (server_dir(tmp_path) / "server.json").exists()
    assert embedded_prefect.status(home=tmp_path) is None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{a['api']}/health", timeout=2)


def test_a_start_that_cannot_finish_in_time_is_retried_once_then_names_setting_log_and_fix(tmp_path):
    lease = embedded_prefect.acquire(home=tmp_path, idle_s=0)
    first_pid = lease.server.pid
    try:
        with pytest.raises(embedded_prefect.EmbeddedServerError) as err:
            lease.wait_ready(timeout_s=0.2)  # far less than Prefect's imports take
    finally:
        lease.release()
    message = str(err.value)
    assert "MMS_PREFECT_START_TIMEOUT_S=0.2" in message
    assert "was not ready within 0.2 s twice" in message
    assert str(server_dir(tmp_path) / "server.log") in message
    assert "mms stack up" in message
    # Both attempts were stopped: nothing is left running for this home.
    assert lease.server.pid != first_pid
    assert _gone(first_pid, timeout_s=10) and _gone(lease.server.pid, timeout_s=10)
    assert embedded_prefect.status(home=tmp_path) is None
