"""A rank in a process of its own (mms_core.training.rank_process), supervised without Dask: its
events and result come back, its own error comes back as itself, the job's stop kills it, and
it leaves by itself when its supervisor's process dies."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from mms_core.errors import DataError, TrainingError
from mms_core.models import ModelSpec
from mms_core.training.rank_process import rank_call, supervise
from mms_core.training.spec import RankResult, TrainJob, TrainSpec


def _job(tmp_path: Path) -> TrainJob:
    return TrainJob(
        manifest_uri=str(tmp_path / "manifest.json"),
        model=ModelSpec(name="mlp"),
        train=TrainSpec(timeout_s=30),
        output_uri=str(tmp_path / "w.safetensors"),
        checkpoint_uri=str(tmp_path / "ckpt"),
    )


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(tmp_path, rank_fn) -> dict:
    return rank_call(job=_job(tmp_path), rank_fn=rank_fn, rank=0, world_size=1, master=f"127.0.0.1:{_port()}")


# Rank functions: module-level, so the rank process imports them by path like the strategies' own.
def reporting_rank(job, *, rank, world_size, emit):
    import torch.distributed as dist

    emit(
        {
            "kind": "progress",
            "step": 1,
            "pid": os.getpid(),
            "sid": os.getsid(0),
            "in_group": dist.is_initialized(),
        }
    )
    return RankResult(rank=rank, params_sha256="ab" * 32, history=[], steps=1, samples=2, train_seconds=0.1)


def failing_rank(job, *, rank, world_size, emit):
    raise DataError("column 'x' has NaN in row 7; clean it and re-run")


class OddError(Exception):
    pass


def odd_error_rank(job, *, rank, world_size, emit):
    raise OddError("odd")


def sleeping_rank(job, *, rank, world_size, emit):
    emit({"kind": "progress", "step": 0, "pid": os.getpid()})
    time.sleep(120)


def test_events_and_result_come_back_from_a_process_of_its_own(tmp_path):
    events: list[dict] = []
    result = supervise(
        _call(tmp_path, reporting_rank), emit=events.append, stopped=lambda: False, name="rank 0"
    )
    assert result.params_sha256 == "ab" * 32 and result.samples == 2
    [ev] = events
    assert ev["pid"] != os.getpid() and ev["in_group"]  # ran in another process, inside a group
    # in a session of its own, as torchrun starts ranks: a Ctrl-C meant for the worker's terminal
    # does not reach it; its supervisor ends it
    assert ev["sid"] == ev["pid"] != os.getsid(0)


def test_the_ranks_own_error_comes_back_as_itself_with_its_traceback(tmp_path):
    with pytest.raises(DataError, match="NaN in row 7") as info:
        supervise(_call(tmp_path, failing_rank), emit=lambda ev: None, stopped=lambda: False, name="rank 0")
    assert any("failing_rank" in note for note in info.value.__notes__)


def test_the_jobs_stop_kills_the_rank_process(tmp_path):
    """A rank stuck for two minutes (as in a collective with a dead peer) is killed once its job
    says stop: the supervisor raises, and the process is gone, not left behind."""
    events: list[dict] = []
    stop = threading.Event()

    def emit(ev: dict) -> None:  # stop as soon as the rank is surely running
        events.append(ev)
        stop.set()

    with pytest.raises(TrainingError, match="stopped by its job"):
        supervise(_call(tmp_path, sleeping_rank), emit=emit, stopped=stop.is_set, name="rank 0")
    assert not _alive(events[0]["pid"])


def test_only_importable_rank_functions_and_no_pickle_reach_the_process(tmp_path):
    """The call is JSON data naming the function by path: a lambda cannot travel, and an error
    type the supervisor does not know comes back as a TrainingError naming it."""
    with pytest.raises(TrainingError, match="define it at module level"):
        rank_call(job=_job(tmp_path), rank_fn=lambda job, **kw: None, rank=0, world_size=1, master="x:1")
    call = _call(tmp_path, odd_error_rank)
    assert json.loads(json.dumps(call)) == call
    with pytest.raises(TrainingError, match="OddError: odd"):
        supervise(call, emit=lambda ev: None, stopped=lambda: False, name="rank 0")


def test_a_stopped_job_starts_no_rank(tmp_path):
    with pytest.raises(TrainingError, match="stopped before this rank started"):
        supervise(_call(tmp_path, reporting_rank), emit=lambda ev: None, stopped=lambda: True, name="rank 0")


def test_the_rank_process_leaves_when_its_supervisor_dies(tmp_path):
    """The supervising process is SIGKILLed (as a lost Dask worker would be): its rank process
    sees the socket close and exits instead of lingering in a collective."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from tests.core.test_rank_process import _call, sleeping_rank
        from mms_core.training.rank_process import rank_call, supervise
        from pathlib import Path
        supervise(_call(Path({str(tmp_path)!r}), sleeping_rank),
                  emit=lambda ev: print(ev["pid"], flush=True), stopped=lambda: False, name="rank 0")
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert psutil.pid_exists(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30  # a liveness bound, far above the ~0.1 s it takes
        while _alive(child):
            assert time.monotonic() < deadline, "the rank process outlived its supervisor"
            time.sleep(0.1)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
