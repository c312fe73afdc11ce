"""Training survives faults: resume from the last checkpoint (bit-exact), skip a corrupt checkpoint,
and finish a DDP run on a real 3-worker LocalCluster after one worker process is SIGKILLed."""

import os
import shutil
import threading

import pytest

from mms_core.data.shard import load_manifest
from mms_core.models import ModelSpec
from mms_core.training.checkpoint import list_checkpoints
from mms_core.training.ddp import run_ddp
from mms_core.training.loop import steps_per_epoch, train_rank
from mms_core.training.spec import TrainJob, TrainSpec
from mms_core.training.strategies import run_strategy


@pytest.fixture(scope="module")
def manifest_uri(digits_manifest):
    return digits_manifest(6)


def _job(manifest_uri, out, **train) -> TrainJob:
    spec = {"epochs": 3, "batch_size": 32, "checkpoint_every": 7, **train}
    return TrainJob(
        manifest_uri=manifest_uri,
        model=ModelSpec(name="mlp"),
        train=TrainSpec(**spec),
        output_uri=str(out / "weights.safetensors"),
        checkpoint_uri=str(out / "ckpt"),
    )


def _steps(path) -> list[int]:
    return [int(uri.rsplit("step-", 1)[1]) for uri in list_checkpoints(str(path))]


@pytest.fixture(scope="module")
def uninterrupted(manifest_uri, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft-full")
    return train_rank(job=_job(manifest_uri, out), rank=0, world_size=1), out


def test_resume_mid_epoch_is_bit_exact(manifest_uri, uninterrupted, tmp_path):
    full, full_out = uninterrupted
    spe = steps_per_epoch(load_manifest(manifest_uri), world_size=1, batch_size=32)
    # "crash" after step 2*7 of a fresh run: train the same job, then drop every later checkpoint
    first = train_rank(job=_job(manifest_uri, tmp_path), rank=0, world_size=1)
    assert first.params_sha256 == full.params_sha256
    kept = _steps(tmp_path / "ckpt")
    assert len(kept) == 3 and kept[-1] == 3 * spe
    for step in kept[1:]:
        for f in (tmp_path / "ckpt" / f"step-{step:08d}").iterdir():
            f.unlink()
        (tmp_path / "ckpt" / f"step-{step:08d}").rmdir()
    resume_step = kept[0]
    assert resume_step % spe != 0  # a checkpoint in the middle of an epoch
    (tmp_path / "weights.safetensors").unlink()

    events: list[dict] = []
    resumed = train_rank(job=_job(manifest_uri, tmp_path), rank=0, world_size=1, emit=events.append)
    assert events[0] == {
        "kind": "resume",
        "step": resume_step,
        "epoch": resume_step // spe + 1,
        "skip": resume_step % spe,
    }
    assert resumed.params_sha256 == full.params_sha256
    assert resumed.steps == full.steps
    assert [m.epoch for m in resumed.history] == [1, 2, 3]
    assert resumed.history[-1].val_accuracy == full.history[-1].val_accuracy
    assert (tmp_path / "weights.safetensors").read_bytes() == (full_out / "weights.safetensors").read_bytes()


def test_rerun_of_a_finished_run_trains_nothing_and_gives_the_same_weights(manifest_uri, uninterrupted):
    full, out = uninterrupted
    events: list[dict] = []
    again = train_rank(job=_job(manifest_uri, out), rank=0, world_size=1, emit=events.append)
    assert [e["kind"] for e in events] == ["resume"]  # no epoch ran
    assert again.params_sha256 == full.params_sha256
    assert again.history == full.history


def test_resume_false_starts_over(manifest_uri, uninterrupted, tmp_path):
    full, out = uninterrupted
    events: list[dict] = []
    fresh = train_rank(job=_job(manifest_uri, out, resume=False), rank=0, world_size=1, emit=events.append)
    assert "resume" not in [e["kind"] for e in events]
    assert [e["epoch"] for e in events if e["kind"] == "epoch"] == [1, 2, 3]
    assert fresh.params_sha256 == full.params_sha256


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(manifest_uri, uninterrupted, tmp_path, caplog):
    full, _ = uninterrupted
    train_rank(job=_job(manifest_uri, tmp_path), rank=0, world_size=1)
    kept = _steps(tmp_path / "ckpt")
    newest = tmp_path / "ckpt" / f"step-{kept[-1]:08d}" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the weights: the file still parses, only the checksum knows
    newest.write_bytes(bytes(data))
    events: list[dict] = []
    with caplog.at_level("WARNING"):
        resumed = train_rank(job=_job(manifest_uri, tmp_path), rank=0, world_size=1, emit=events.append)
    assert "checksum mismatch" in caplog.text and f"step-{kept[-1]:08d}" in caplog.text
    assert events[0]["kind"] == "resume" and events[0]["step"] == kept[-2]
    assert resumed.params_sha256 == full.params_sha256  # redone from the previous checkpoint


# --- a worker dies mid-run ------------------------------------------------------------------

KILL_AFTER_STEP = 60
EPOCHS = 12  # about 5 s of training on 2 cores: long enough to kill a worker mid-run


def _ddp_job(manifest_uri, out) -> TrainJob:
    return _job(manifest_uri, out, epochs=EPOCHS, batch_size=8, checkpoint_every=20, lr=1e-3, timeout_s=60)


@pytest.fixture(scope="module")
def cluster3(training_cluster):
    with training_cluster(3) as client:
        yield client


@pytest.mark.slow
def test_killing_one_of_three_workers_mid_run_still_finishes(cluster3, manifest_uri, tmp_path, kill_worker):
    """A rank's worker is SIGKILLed: the job re-places its ranks on the workers there are and
    resumes from its last checkpoint; the surviving workers are never restarted. The run has
    training.resume=false over a key holding a finished earlier run's checkpoints: those are
    cleared first, and the fail-over resumes from this run's own."""
    reference = run_ddp(client=cluster3, job=_ddp_job(manifest_uri, tmp_path / "ref"))[0]
    shutil.copytree(tmp_path / "ref" / "ckpt", tmp_path / "run" / "ckpt")  # would resume at the end
    pids = cluster3.run(os.getpid)

    events: list[dict] = []
    killed: list[int] = []

    def on_event(ev: dict) -> None:
        events.append(ev)
        if ev.get("step", 0) >= KILL_AFTER_STEP and not killed:
            killed.append(kill_worker(cluster3, 1))  # rank 1's worker

    job = _ddp_job(manifest_uri, tmp_path / "run")
    job = job.model_copy(update={"train": job.train.model_copy(update={"resume": False})})
    results = run_strategy(client=cluster3, job=job, on_event=on_event)
    assert killed, "training ended before the worker could be killed: make the run longer"
    assert events[0]["kind"] != "resume"  # the earlier run's checkpoints were cleared
    restarts = [e for e in events if e["kind"] == "restart"]
    resumes = [e for e in events if e["kind"] == "resume"]
    assert len(restarts) == 1 and len(resumes) == 1, (restarts, resumes)
    assert "left the cluster" in restarts[0]["reason"]
    # at most one checkpoint interval of steps is repeated
    assert restarts[0]["last_step"] - resumes[0]["step"] < job.train.checkpoint_every
    assert resumes[0]["step"] > 0
    r0 = results[0]
    assert [m.epoch for m in r0.history] == list(range(1, EPOCHS + 1))
    assert abs(r0.history[-1].val_accuracy - reference.history[-1].val_accuracy) <= 0.01
    assert len(results) in (2, 3) and len({r.params_sha256 for r in results}) == 1
    survivors = {addr: pid for addr, pid in pids.items() if pid != killed[0]}
    now = cluster3.run(os.getpid)
    assert len(survivors) == 2 and all(now.get(addr) == pid for addr, pid in survivors.items()), (pids, now)
    assert threading.active_count() < 100


def test_resume_on_another_step_count_keeps_the_fraction_of_the_epoch(manifest_uri, uninterrupted, tmp_path):
    """After a lost worker the group may restart on fewer ranks, so an epoch has another number of
    steps; the resumed epoch starts at the same fraction. (Same effect here: batch 32 -> 16.)"""
    _, full_out = uninterrupted
    kept = _steps(full_out / "ckpt")
    shutil.copytree(full_out / "ckpt" / f"step-{kept[0]:08d}", tmp_path / "ckpt" / f"step-{kept[0]:08d}")
    spe32 = steps_per_epoch(load_manifest(manifest_uri), world_size=1, batch_size=32)
    spe16 = steps_per_epoch(load_manifest(manifest_uri), world_size=1, batch_size=16)
    done = kept[0] % spe32
    events: list[dict] = []
    resumed = train_rank(
        job=_job(manifest_uri, tmp_path, batch_size=16), rank=0, world_size=1, emit=events.append
    )
    epoch = kept[0] // spe32 + 1
    assert events[0] == {
        "kind": "resume",
        "step": (epoch - 1) * spe16 + done * spe16 // spe32,
        "epoch": epoch,
        "skip": done * spe16 // spe32,
    }
    assert [m.epoch for m in resumed.history] == [1, 2, 3]
    assert resumed.steps == 3 * spe16
