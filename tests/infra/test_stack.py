"""The local stack: real Prefect, MLflow and Dask processes on loopback, and safe teardown."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from infra.stack import (
    ComponentState,
    StackError,
    StackState,
    _write_state,
    stack_down,
    stack_env,
    stack_status,
    stack_up,
)

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    try:
        yield tmp_path
    finally:
        stack_down(home=tmp_path, timeout_s=10)  # whatever the test did, leave no process behind


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_stack_up_status_down(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed import Client

    # Inherited from an earlier Dask cluster in this process (or a shell): workers must not get it.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")

    with_redis = shutil.which("redis-server") is not None  # .ci/run installs it
    state = stack_up(home=home, with_redis=with_redis, timeout_s=150)
    names = {c.name for c in state.components}
    expected = ["dask-worker-0", "dask-worker-1", "dask-scheduler", "prefect", "mlflow"] + [
        "redis"
    ] * with_redis
    assert names == set(expected)
    assert (home / "stack" / "stack.json").exists()

    status = stack_status(home=home)
    assert status is not None and status.all_alive, status

    env = stack_env(state)
    assert env["PREFECT_API_URL"].startswith("http://127.0.0.1:")
    assert ("MMS_REDIS_URL" in env) == with_redis
    if with_redis:
        import redis

        assert redis.Redis.from_url(env["MMS_REDIS_URL"], socket_timeout=5).ping()
    with Client(env["MMS_DASK_ADDRESS"], timeout=30, set_as_default=False) as client:
        assert client.submit(lambda: 1 + 1).result(timeout=30) == 2
        assert len(client.nthreads()) == 2
        # Workers get infra.cluster's training settings through their DASK_CONFIG file.
        trim = client.run(lambda: __import__("os").environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert set(trim.values()) == {None}
    with _HTTP.open(f"{env['MMS_MLFLOW_URI']}/health", timeout=10) as resp:
        assert resp.status == 200
    with _HTTP.open(f"{env['PREFECT_API_URL']}/health", timeout=10) as resp:
        assert resp.status == 200

    again = stack_up(home=home, with_redis=with_redis)
    assert {c.name: c.pid for c in again.components} == {c.name: c.pid for c in state.components}

    pids = [c.pid for c in state.components]
    stopped = stack_down(home=home)
    assert stopped == expected
    assert all(_gone(pid) for pid in pids)
    assert not (home / "stack" / "stack.json").exists()
    assert stack_status(home=home) is None
    assert stack_down(home=home) == []


@pytest.mark.slow
def test_failed_start_names_the_component_and_cleans_up(home: Path) -> None:
    before = {p.pid for p in psutil.process_iter()}
    with pytest.raises(StackError, match=r"'prefect' was not ready.*see its log .*prefect\.log"):
        stack_up(home=home, with_redis=False, timeout_s=1)
    ours = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before and not _gone(p.pid)]
    assert not [p for p in ours if str(home) in " ".join(p.info["cmdline"] or [])]
    assert not (home / "stack" / "stack.json").exists()


def test_stack_down_spares_a_pid_running_something_else(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        created = psutil.Process(sleeper.pid).create_time()
        log = tmp_path / "x.log"
        impostors = [
            # Same pid and start time, other command: the pid does not belong to the stack.
            ComponentState(name="prefect", pid=sleeper.pid, command=["/venv/bin/prefect", "server", "start"],
                           log=log, started_at=datetime.now(UTC), create_time=created),
            # Same command, other start time: a recycled pid.
            ComponentState(name="mlflow", pid=sleeper.pid, command=["sleep", "30"],
                           log=log, started_at=datetime.now(UTC), create_time=created - 100),
        ]  # fmt: skip
        (tmp_path / "stack").mkdir()
        _write_state(StackState(home=tmp_path, started_at=datetime.now(UTC), components=impostors))

        status = stack_status(home=tmp_path)
        assert status is not None and not any(c.alive for c in status.components)
        assert stack_down(home=tmp_path, timeout_s=1) == []
        assert sleeper.poll() is None, "stack_down killed a process it did not start"
        assert not (tmp_path / "stack" / "stack.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
