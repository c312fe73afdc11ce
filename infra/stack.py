"""The local "real server" stack behind `mms stack up|down|status`, on 127.0.0.1 only.

Starts a Prefect server, an MLflow server, a Dask scheduler with two nanny-managed workers and,
when `redis-server` is installed, Redis; each as a background process in its own session, with
its output in `<home>/stack/logs/`. What was started is recorded in `<home>/stack/stack.json`
so that `stack_down` stops exactly those processes and nothing else.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil
from pydantic import BaseModel, Field

from infra.dask_config import WORKER_UNSET_ENV, worker_config_yaml
from infra.procs import (
    HOST,
    bind_port,
    cmdline_matches,
    http_ok,
    locked,
    same_process,
    tcp_ok,
    terminate,
)

log = logging.getLogger(__name__)

N_WORKERS = 2
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000, "dask-scheduler": 8786, "redis": 6379}
# Workers before their scheduler; Redis last because nothing else depends on it being gone.
STOP_ORDER = ("dask-worker", "dask-scheduler", "prefect", "mlflow", "redis")


_Proc = subprocess.Popen[bytes]


class StackError(RuntimeError):
    """A stack component failed to start; the message names it and its log file."""


class ComponentState(BaseModel):
    """One process started by the stack, as recorded in stack.json."""

    name: str = Field(description="Component name, e.g. 'prefect' or 'dask-worker-0'.")
    pid: int = Field(description="Process id of the session leader (its process group id too).")
    command: list[str] = Field(description="The argv it was started with.")
    port: int | None = Field(default=None, description="Loopback port it listens on, if any.")
    url: str | None = Field(default=None, description="Address a client uses, if any.")
    log: Path = Field(description="File holding its stdout and stderr.")
    started_at: datetime = Field(description="When it was launched (UTC).")
    create_time: float = Field(description="psutil create_time; tells our process from a recycled pid.")
    alive: bool | None = Field(default=None, description="Filled by stack_status/stack_up, not stored.")


class StackState(BaseModel):
    """The whole recorded stack."""

    home: Path = Field(description="The MMS home the stack keeps its state under.")
    started_at: datetime = Field(description="When stack_up launched it (UTC).")
    components: list[ComponentState] = Field(default_factory=list)
    skipped: dict[str, str] = Field(default_factory=dict, description="Component -> why it was not started.")

    def component(self, name: str) -> ComponentState | None:
        """Return the component called `name`, or None."""
        return next((c for c in self.components if c.name == name), None)

    @property
    def all_alive(self) -> bool:
        """True when every recorded component was found alive."""
        return bool(self.components) and all(c.alive for c in self.components)


@dataclass
class _Launch:
    name: str
    command: list[str]
    port: int | None = None
    url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()  # variables the process must not inherit


def _stack_dir(home: Path) -> Path:
    return home.expanduser().resolve() / "stack"


def _venv_bin(name: str) -> str:
    # The venv's own scripts, so the stack works without an activated venv.
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise StackError(f"{name!r} not found next to {sys.executable}; is the venv installed?")
    return str(path)


def _pick_port(preferred: int, taken: set[int]) -> int:
    port = bind_port(preferred) if preferred not in taken else None
    while port is None or port in taken:
        port = bind_port(0)
    taken.add(port)
    return port


def _read_state(home: Path) -> StackState | None:
    path = _stack_dir(home) / "stack.json"
    return StackState.model_validate_json(path.read_text()) if path.exists() else None


def _write_state(state: StackState) -> None:
    directory = _stack_dir(state.home)
    data = state.model_dump_json(indent=2, exclude={"components": {"__all__": {"alive"}}})
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".stack.", delete=False) as tmp:
        tmp.write(data)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, directory / "stack.json")


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    # Two `mms stack up` at once must not start two stacks.
    with locked(_stack_dir(home) / ".lock"):
        yield


def _probe(comp: ComponentState) -> bool:
    """Health check by kind; a worker has no port of its own, its process is its health."""
    if comp.name == "prefect":
        return http_ok(f"http://{HOST}:{comp.port}/api/health")
    if comp.name == "mlflow":
        return http_ok(f"http://{HOST}:{comp.port}/health")
    if comp.name == "redis":
        return tcp_ok(comp.port or 0, b"PING\r\n", b"+PONG")
    if comp.name == "dask-scheduler":
        return tcp_ok(comp.port or 0)
    return True


def _owned_process(comp: ComponentState) -> psutil.Process | None:
    """The live process behind `comp`, or None when it is gone or the pid now belongs to another."""
    proc = same_process(comp.pid, comp.create_time)
    if proc is None:
        return None
    try:
        if cmdline_matches(proc.cmdline(), comp.command):
            return proc
        # redis-server rewrites its cmdline to a title ("redis-server 127.0.0.1:6379"); its kernel
        # name still says what it runs.
        if comp.name == "redis" and proc.name() == "redis-server" == Path(comp.command[0]).name:
            return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return None


def _spawn(launch: _Launch, logs: Path) -> tuple[ComponentState, _Proc]:
    log_path = logs / f"{launch.name}.log"
    env = {k: v for k, v in {**os.environ, **launch.env}.items() if k not in launch.unset}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            launch.command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=env, cwd=logs.parent, start_new_session=True,
        )  # fmt: skip
    comp = ComponentState(
        name=launch.name, pid=proc.pid, command=launch.command, port=launch.port, url=launch.url,
        log=log_path, started_at=datetime.now(UTC), create_time=psutil.Process(proc.pid).create_time(),
    )  # fmt: skip
    return comp, proc


def _stop_all(state: StackState, timeout_s: float) -> list[str]:
    stopped = []
    rank = {comp.name: next((i for i, p in enumerate(STOP_ORDER) if comp.name.startswith(p)), 99)
            for comp in state.components}  # fmt: skip
    for comp in sorted(state.components, key=lambda c: rank[c.name]):
        proc = _owned_process(comp)
        if proc is None:
            log.info("%s (pid %d) already gone or not ours; leaving it", comp.name, comp.pid)
            continue
        terminate(proc, timeout_s)
        stopped.append(comp.name)
    return stopped


def _client_env(ports: dict[str, int]) -> dict[str, str]:
    env = {
        "PREFECT_API_URL": f"http://{HOST}:{ports['prefect']}/api",
        "MMS_MLFLOW_URI": f"http://{HOST}:{ports['mlflow']}",
        "MMS_DASK_ADDRESS": f"tcp://{HOST}:{ports['dask-scheduler']}",
    }
    if "redis" in ports:
        env["MMS_REDIS_URL"] = f"redis://{HOST}:{ports['redis']}/0"
    return env


def _prefect_env(home: Path) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect' / 'prefect.db'}",
    }


def _server_launches(home: Path, ports: dict[str, int], client: dict[str, str]) -> list[_Launch]:
    prefect = [_venv_bin("prefect"), "server", "start", "--host", HOST, "--port", str(ports["prefect"])]
    mlflow = [
        _venv_bin("mlflow"), "server", "--host", HOST, "--port", str(ports["mlflow"]), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{home / 'mlflow-server.db'}",
        "--artifacts-destination", str(home / "mlartifacts"),
    ]  # fmt: skip
    # Its own URL, not whatever PREFECT_API_URL the caller's shell had.
    prefect_env = {**_prefect_env(home), "PREFECT_API_URL": client["PREFECT_API_URL"]}
    # Job execution (GenAI scorers, trace rollups) adds ~8 huey processes that MMS never uses.
    mlflow_env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    has_bokeh = importlib.util.find_spec("bokeh") is not None
    dashboard = ["--dashboard-address", f"{HOST}:0"] if has_bokeh else ["--no-dashboard"]
    scheduler = [_venv_bin("dask"), "scheduler", "--host", HOST, "--port", str(ports["dask-scheduler"])]
    return [
        _Launch("prefect", prefect, ports["prefect"], client["PREFECT_API_URL"], prefect_env),
        _Launch("mlflow", mlflow, ports["mlflow"], client["MMS_MLFLOW_URI"], mlflow_env),
        _Launch("dask-scheduler", scheduler + dashboard, ports["dask-scheduler"], client["MMS_DASK_ADDRESS"]),
    ]


def _worker_config(home: Path) -> Path:
    """The training-friendly Dask settings of infra.cluster, as the workers' DASK_CONFIG file."""

    path = home / "stack" / "dask-worker.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(worker_config_yaml())
    return path


def _plan(home: Path, ports: dict[str, int]) -> list[_Launch]:
    """The commands to run, given the port picked for each server."""
    client = _client_env(ports)
    plan = _server_launches(home, ports, client)
    # Workers report Prefect task runs to this server instead of each starting a temporary one.
    worker_env = {
        **_prefect_env(home),
        **client,
        "MMS_HOME": str(home),
        "DASK_CONFIG": str(_worker_config(home)),
    }
    for i in range(N_WORKERS):
        command = [
            _venv_bin("dask"), "worker", client["MMS_DASK_ADDRESS"], "--name", f"worker-{i}",
            "--nthreads", "1", "--nworkers", "1", "--memory-limit", "4GiB", "--host", HOST,
            "--no-dashboard", "--local-directory", str(home / "stack" / "dask-worker-space"),
        ]  # fmt: skip
        plan.append(_Launch(f"dask-worker-{i}", command, env=worker_env, unset=WORKER_UNSET_ENV))
    if "redis" in ports:
        command = [
            shutil.which("redis-server") or "redis-server", "--bind", HOST, "--port", str(ports["redis"]),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(home / "stack"),
        ]  # fmt: skip
        plan.append(_Launch("redis", command, ports["redis"], client["MMS_REDIS_URL"]))
    return plan


def _fail(comp: ComponentState, why: str) -> StackError:
    lines = comp.log.read_text(errors="replace").splitlines()[-15:] if comp.log.exists() else []
    tail = "\n".join(f"    {line}" for line in lines)
    return StackError(f"stack component {comp.name!r} {why}; see its log {comp.log}\n{tail}")


def _wait_for(comp: ComponentState, proc: _Proc, ready: Callable[[], bool], deadline: float) -> None:
    while not ready():
        if proc.poll() is not None:
            raise _fail(comp, f"exited with code {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise _fail(comp, "was not ready before the timeout")
        time.sleep(0.25)


def _wait_workers(started: dict[str, tuple[ComponentState, _Proc]], deadline: float) -> None:
    from distributed import Client  # heavy import; only `stack up` needs it

    sched = started["dask-scheduler"][0]
    workers = [v for k, v in started.items() if k.startswith("dask-worker")]
    remaining = max(1.0, deadline - time.monotonic())
    with Client(sched.url, timeout=remaining, set_as_default=False) as client:
        while len(client.nthreads()) < len(workers):
            for comp, proc in workers:
                if proc.poll() is not None:
                    raise _fail(comp, f"exited with code {proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise _fail(workers[0][0], f"and its peers did not all join {sched.url} before the timeout")
            time.sleep(0.25)


def _listens(pid: int, port: int) -> bool:
    """True when ``pid`` or one of its children listens on ``port``. The port was free when picked,
    but another program (another user's stack) may take it before our server binds; then the
    health check would be answered by that program while ours exits with "address in use"."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for proc in procs:
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in proc.net_connections("inet")
            ):
                return True
    return False


def _ready(comp: ComponentState) -> bool:
    return _probe(comp) and (comp.port is None or _listens(comp.pid, comp.port))


def _wait_all(started: dict[str, tuple[ComponentState, _Proc]], deadline: float) -> None:
    for name, (comp, proc) in started.items():
        if not name.startswith("dask-worker"):
            _wait_for(comp, proc, lambda c=comp: _ready(c), deadline)
    _wait_workers(started, deadline)


def _start(home: Path, with_redis: bool, timeout_s: float) -> StackState:
    t0 = time.monotonic()
    names, skipped = ["prefect", "mlflow", "dask-scheduler"], {}
    if with_redis and shutil.which("redis-server"):
        names.append("redis")
    elif with_redis:
        skipped["redis"] = "redis-server not on PATH"
    taken: set[int] = set()
    ports = {n: _pick_port(DEFAULT_PORTS[n], taken) for n in names}
    logs = _stack_dir(home) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    state = StackState(home=home, started_at=datetime.now(UTC), skipped=skipped)
    started: dict[str, tuple[ComponentState, _Proc]] = {}
    try:
        for launch in _plan(home, ports):
            started[launch.name] = _spawn(launch, logs)
            state.components.append(started[launch.name][0])
        _write_state(state)  # recorded before waiting, so `stack down` can clean up a killed start
        _wait_all(started, t0 + timeout_s)
    except BaseException:
        _stop_all(state, timeout_s=10)
        (_stack_dir(home) / "stack.json").unlink(missing_ok=True)
        raise
    for comp in state.components:
        comp.alive = True
    log.info("stack up in %.1f s: %s", time.monotonic() - t0, stack_env(state))
    return state


def stack_up(*, home: Path, with_redis: bool = True, timeout_s: float = 120) -> StackState:
    """Start the local stack, or return the running one.

    Idempotent: when a recorded stack is fully alive it is returned untouched. A partly dead
    one is stopped (only its own processes) and started afresh.

    Args:
        home: MMS home; state goes to `<home>/stack/`, server data beside it.
        with_redis: Start Redis too, when `redis-server` is on PATH (else recorded as skipped).
        timeout_s: Seconds all components together get to become ready.

    Returns:
        The recorded state, every component marked alive.

    Raises:
        StackError: A component did not start; everything started so far has been stopped.
    """
    home = home.expanduser().resolve()
    with _locked(home):
        current = stack_status(home=home)
        if current is not None and current.all_alive:
            return current
        if current is not None:
            log.warning("recorded stack in %s is partly dead; restarting it", home)
            _stop_all(current, timeout_s=10)
        return _start(home, with_redis, timeout_s)


def stack_status(*, home: Path) -> StackState | None:
    """Read the recorded stack and check each component.

    Args:
        home: MMS home the stack was started with.

    Returns:
        The recorded state with `alive` set per component (process is ours and answers its
        health probe), or None when no stack is recorded.
    """
    state = _read_state(home)
    if state is None:
        return None
    for comp in state.components:
        comp.alive = _owned_process(comp) is not None and _probe(comp)
    return state


def stack_down(*, home: Path, timeout_s: float = 30) -> list[str]:
    """Stop exactly the processes `stack_up` recorded, and forget the stack.

    A recorded pid is only signalled when it still runs the recorded command and was created at
    the recorded time, so a recycled pid is never killed. Each process group gets SIGTERM, then
    SIGKILL after `timeout_s`. Order: Dask workers, scheduler, Prefect, MLflow, Redis.

    Args:
        home: MMS home the stack was started with.
        timeout_s: Seconds each component gets to exit after SIGTERM.

    Returns:
        Names of the components that were stopped; empty when nothing was recorded or running.
    """
    home = home.expanduser().resolve()
    with _locked(home):
        state = _read_state(home)
        if state is None:
            return []
        stopped = _stop_all(state, timeout_s)
        (_stack_dir(home) / "stack.json").unlink(missing_ok=True)
        return stopped


def stack_env(state: StackState) -> dict[str, str]:
    """Client settings pointing at the stack.

    Args:
        state: A state from `stack_up` or `stack_status`.

    Returns:
        PREFECT_API_URL, MMS_MLFLOW_URI, MMS_DASK_ADDRESS, and MMS_REDIS_URL when Redis runs.
    """
    ports = {c.name: c.port for c in state.components if c.port is not None}
    return _client_env(ports)
