"""A training rank in a process of its own, started and supervised by the Dask task that hosts it.

Why a process per rank: a Dask worker is shared. It hosts serving replicas, stream consumers,
tuning trials and batch predictions beside training. A rank's process group (gloo or NCCL
threads, sockets, CUDA context) lives and dies with its own process, so a job never needs to
restart a worker to get a clean one, and a broken collective is ended by killing one process,
not the worker.

Wiring: the task (``supervise``, on the worker) makes a socketpair, starts
``python -m mms_core.training.rank_process <fd>`` with the worker's environment and import path,
and sends it the pickled call (job, rank function, rank, world size, rendezvous address). The
child sends back ("event", dict) messages, which the task relays as Dask worker events, then
("result", RankResult) or ("error", exception, traceback text). Pickle travels only between
these two processes of ours, over a private socketpair; nothing from a user or the network is
unpickled.

Ending: the task kills the child (SIGKILL) when the job's stop event is set (the job's launcher
sets it when any rank fails or a worker is lost, and when the job ends), so surviving ranks
stuck in a collective with a dead peer go at once. The child exits by itself if its task's
process dies: it watches the socket and leaves on end-of-file.
"""

from __future__ import annotations

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

import cloudpickle

from mms_core.errors import TrainingError

STOP_POLL_S = 1.0  # how often the supervising task asks whether the job wants its rank stopped


def supervise(
    call: dict[str, Any], *, emit: Callable[[dict], None], stopped: Callable[[], bool], name: str
) -> Any:
    """Runs in the Dask task: start the rank's process, relay its events, return its result.

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
        )
        theirs.close()
        conn = Connection(os.dup(ours.fileno()))
        try:
            conn.send_bytes(cloudpickle.dumps(call))
            return _follow(conn, proc, emit=emit, stopped=stopped, name=name)
        finally:
            conn.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _follow(conn: Connection, proc: subprocess.Popen, *, emit, stopped, name: str) -> Any:
    checked = 0.0
    while True:
        if conn.poll(0.2):
            try:
                kind, *payload = conn.recv()
            except EOFError:
                break  # the process ended; its exit code says how below
            if kind == "event":
                emit(payload[0])
            elif kind == "result":
                return payload[0]
            else:  # "error": the rank's own exception, with the child's traceback as a note
                exc, text = payload
                exc.add_note(f"in {name}'s process:\n{text}")
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


def _child(fd: int) -> None:
    conn = Connection(fd)
    call = cloudpickle.loads(conn.recv_bytes())
    lock = threading.Lock()

    def send(*msg: Any) -> None:
        with lock:
            conn.send(msg)

    # The socket's only other message is end-of-file, when the supervising task's process is
    # gone: then nobody waits for this rank, so it leaves at once.
    threading.Thread(target=_exit_on_eof, args=(conn,), daemon=True).start()
    try:
        result = _run_rank(**call, emit=lambda ev: send("event", ev))
    except BaseException as exc:  # everything goes back to the task, which re-raises it
        text = traceback.format_exc()
        try:
            send("error", exc, text)
        except Exception:  # an exception that does not pickle: its text still tells the story
            send("error", TrainingError(f"{type(exc).__name__}: {exc}"), text)
        return
    send("result", result)


def _exit_on_eof(conn: Connection) -> None:
    try:
        while True:
            conn.recv_bytes()
    except (EOFError, OSError):
        os._exit(70)


def _run_rank(*, job: Any, rank_fn: Callable, rank: int, world_size: int, master: str, emit: Callable) -> Any:
    """In the rank's process: join the process group, run the rank, leave together."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=job.train.timeout_s),
    )
    try:
        result = rank_fn(job, rank=rank, world_size=world_size, emit=emit)
        # Leave together: a rank tearing gloo down while its peer still talks to it can abort
        # ("terminate called without an active exception"), seen under torchrun in bench/.
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _child(int(sys.argv[1]))
