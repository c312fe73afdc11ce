"""A training rank in a process of its own, started and supervised by the Dask task that hosts it.

Why a process per rank: a Dask worker is shared. It hosts serving replicas, stream consumers,
tuning trials and batch predictions beside training. A rank's process group (gloo or NCCL
threads, sockets, CUDA context) lives and dies with its own process, so a job never needs to
restart a worker to get a clean one, and a broken collective is ended by killing one process,
not the worker.

Wiring: the task (``supervise``, on the worker) makes a socketpair, starts
``python -m mms_core.training.rank_process <fd>`` with the worker's environment and import path,
and sends it the call as JSON: the job, the rank function's import path (``module:name``, a
module-level function), rank, world size and rendezvous address. The child sends back JSON
messages: events (relayed as Dask worker events), then the RankResult or the error (its type,
message and traceback). Nothing is unpickled: the messages are data, and the only code the child
runs is a function the supervisor named by its import path.

Ending: the task kills the child (SIGKILL) when the job's stop event is set (the job's launcher
sets it when any rank fails or a worker is lost, and when the job ends), so surviving ranks
stuck in a collective with a dead peer go at once. The child exits by itself if its task's
process dies: it watches the socket and leaves on end-of-file.
"""

from __future__ import annotations

import builtins
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

from mms_core import errors
from mms_core.errors import TrainingError
from mms_core.training.spec import RankResult, TrainJob

STOP_POLL_S = 1.0  # how often the supervising task asks whether the job wants its rank stopped


def rank_call(*, job: TrainJob, rank_fn: Callable, rank: int, world_size: int, master: str) -> dict:
    """The call a rank process runs, as JSON-able data: ``rank_fn`` must be a module-level function."""
    module = rank_fn.__module__
    if module == "__main__":  # a script run as ``python -m pkg.mod``: the name it is importable by
        module = getattr(sys.modules["__main__"].__spec__, "name", None) or module
    path = f"{module}:{rank_fn.__qualname__}"
    if "<" in path or module == "__main__":
        raise TrainingError(
            f"rank function {path} cannot be imported by a rank process: define it at module level "
            "in an importable module"
        )
    return {
        "job": job.model_dump(mode="json"),
        "rank_fn": path,
        "rank": rank,
        "world_size": world_size,
        "master": master,
    }


def supervise(
    call: dict[str, Any], *, emit: Callable[[dict], None], stopped: Callable[[], bool], name: str
) -> RankResult:
    """Runs in the Dask task: start the rank's process (``call`` from :func:`rank_call`), relay its
    events, return its result.

    ``stopped()`` is polled; once it is true the process is killed and TrainingError raised.
    """
    if stopped():
        raise TrainingError(f"{name}: the job stopped before this rank started")
    ours, theirs = socket.socketpair()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with ours, theirs:
        proc = subprocess.Popen(  # noqa: S603 - our own module, with the worker's interpreter
            [sys.executable, "-m", "mms_core.training.rank_process", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,
            # A session of its own, as torchrun gives its ranks: a signal for the worker's process
            # group (Ctrl-C in the terminal of `dask worker`) reaches the worker only; the rank
            # ends through its supervisor (stop, or end-of-file when the worker's process exits).
            start_new_session=True,
        )
        theirs.close()
        conn = Connection(os.dup(ours.fileno()))
        try:
            conn.send_bytes(json.dumps(call).encode())
            return _follow(conn, proc, emit=emit, stopped=stopped, name=name)
        finally:
            conn.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _follow(conn: Connection, proc: subprocess.Popen, *, emit, stopped, name: str) -> RankResult:
    checked = 0.0
    while True:
        if conn.poll(0.2):
            try:
                msg = json.loads(conn.recv_bytes())
            except EOFError:
                break  # the process ended; its exit code says how below
            if msg["kind"] == "event":
                emit(msg["event"])
            elif msg["kind"] == "result":
                return RankResult.model_validate(msg["result"])
            else:  # "error": the rank's own exception, with the child's traceback as a note
                exc = _exception(msg["type"], msg["message"])
                exc.add_note(f"in {name}'s process:\n{msg['traceback']}")
                raise exc
        elif proc.poll() is not None and not conn.poll(0):
            break
        if time.monotonic() - checked > STOP_POLL_S:
            checked = time.monotonic()
            if stopped():
                proc.kill()
                raise TrainingError(f"{name}: stopped by its job (another rank failed or a worker was lost)")
    code = proc.wait()
    raise TrainingError(f"{name}: its process exited with code {code} before reporting a result")


def _exception(type_name: str, message: str) -> BaseException:
    """The rank's error as its own type when that is one of MMS's errors or a built-in exception
    (looked up by name, never imported from what the message says), else a TrainingError."""
    cls = getattr(errors, type_name, None) or getattr(builtins, type_name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:  # a constructor that wants more than a message
            pass
    return TrainingError(f"{type_name}: {message}")


def _child(fd: int) -> None:
    conn = Connection(fd)
    call = json.loads(conn.recv_bytes())
    lock = threading.Lock()

    def send(msg: dict) -> None:
        data = json.dumps(msg, default=str).encode()
        with lock:
            conn.send_bytes(data)

    # The socket's only other message is end-of-file, when the supervising task's process is
    # gone: then nobody waits for this rank, so it leaves at once.
    threading.Thread(target=_exit_on_eof, args=(conn,), daemon=True).start()
    try:
        result = _run_rank(**call, emit=lambda ev: send({"kind": "event", "event": ev}))
    except BaseException as exc:  # everything goes back to the task, which re-raises it
        text = traceback.format_exc()
        send({"kind": "error", "type": type(exc).__name__, "message": str(exc), "traceback": text})
        return
    send({"kind": "result", "result": result.model_dump(mode="json")})


def _exit_on_eof(conn: Connection) -> None:
    try:
        while True:
            conn.recv_bytes()
    except (EOFError, OSError):
        os._exit(70)


def _run_rank(
    *, job: dict, rank_fn: str, rank: int, world_size: int, master: str, emit: Callable
) -> RankResult:
    """In the rank's process: join the process group, run the rank, leave together."""
    import torch
    import torch.distributed as dist

    module, _, qualname = rank_fn.partition(":")
    fn = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    train_job = TrainJob.model_validate(job)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=train_job.train.timeout_s),
    )
    try:
        result = fn(train_job, rank=rank, world_size=world_size, emit=emit)
        # Leave together: a rank tearing gloo down while its peer still talks to it can abort
        # ("terminate called without an active exception"), seen under torchrun in bench/.
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _child(int(sys.argv[1]))
