"""DDP training on a real 2-worker Dask LocalCluster (gloo on CPU), and the per-rank loop alone."""

import hashlib
import json
import math
import os
import re
import threading
from pathlib import Path

import pytest
import torch
from distributed import Client, LocalCluster
from safetensors.torch import load as st_load

from mms_core import steps
from mms_core.data.ingest import DataSpec
from mms_core.data.shard import ShardSpec, load_manifest, preprocess_and_shard, read_shard, shards_for_rank
from mms_core.errors import TrainingError
from mms_core.evaluate import predict_classes
from mms_core.models import ModelSpec, build_model
from mms_core.training import checkpoint as ckpt_mod
from mms_core.training.ddp import run_ddp
from mms_core.training.loop import steps_per_epoch, train_rank
from mms_core.training.spec import TrainJob, TrainSpec

EPOCHS = 5
EVERY = 10
BATCH = 32


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ddp-data"))


@pytest.fixture(scope="module")
def manifest_uri(data_root):
    raw = steps.ingest(spec=DataSpec(source="builtin://digits"), root=data_root)
    return preprocess_and_shard(
        raw_uri=raw.uri, source_sha256=raw.sha256, label="label", spec=ShardSpec(n_shards=4), root=data_root
    )


def _cluster(n_workers: int) -> LocalCluster:
    return LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )


@pytest.fixture(scope="module")
def client(training_cluster):
    with training_cluster(2) as client:
        yield client


def _job(manifest_uri, out, *, model="mlp", **train) -> TrainJob:
    spec = {"epochs": EPOCHS, "checkpoint_every": EVERY, "batch_size": BATCH, **train}
    return TrainJob(
        manifest_uri=manifest_uri,
        model=ModelSpec(name=model),
        train=TrainSpec(**spec),
        output_uri=str(out / "weights.safetensors"),
        checkpoint_uri=str(out / "ckpt"),
    )


def _sha_of_state(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _worker_pids(client) -> set[int]:
    return set(client.run(os.getpid).values())


def test_world_size_larger_than_cluster_raises(client, manifest_uri, tmp_path):
    job = _job(manifest_uri, tmp_path, world_size=3, epochs=1)
    with pytest.raises(TrainingError, match=r"world_size=3.*2 workers"):
        run_ddp(client=client, job=job)
    assert not (tmp_path / "weights.safetensors").exists()


def test_cluster_without_workers_raises_training_error(manifest_uri, tmp_path):
    with _cluster(0) as cluster, Client(cluster) as c:
        assert c.scheduler_info()["workers"] == {}
        with pytest.raises(TrainingError, match="0 workers|no workers"):
            run_ddp(client=c, job=_job(manifest_uri, tmp_path, epochs=1))


@pytest.fixture(scope="module")
def failed_job(client, manifest_uri, tmp_path_factory):
    """A job whose model module does not exist; it runs before `first_run`, which must recover."""
    out = tmp_path_factory.mktemp("ddp-bad")
    job = _job(manifest_uri, out, model="mms_no_such_pkg_xyz.models:build", epochs=1)
    pids_before = _worker_pids(client)
    with pytest.raises(TrainingError) as info:
        run_ddp(client=client, job=job)
    return {"error": info.value, "out": out, "pids_before": pids_before, "pids": _worker_pids(client)}


def test_unknown_model_module_raises_training_error_naming_it(failed_job):
    msg = str(failed_job["error"])
    assert "mms_no_such_pkg_xyz" in msg
    assert re.match(r"rank \d (failed|ended as error)", msg)
    assert "cannot import module" in msg
    assert not (failed_job["out"] / "weights.safetensors").exists()
    # the ranks failed in processes of their own: the workers that hosted them are still the same
    assert failed_job["pids"] == failed_job["pids_before"] and len(failed_job["pids"]) == 2


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.threads: set[int] = set()

    def __call__(self, ev: dict) -> None:
        self.events.append(ev)
        self.threads.add(threading.get_ident())


@pytest.fixture(scope="module")
def first_run(client, manifest_uri, tmp_path_factory, failed_job):
    out = tmp_path_factory.mktemp("ddp-run1")
    job = _job(manifest_uri, out)
    rec = Recorder()
    pids_before = _worker_pids(client)
    results = run_ddp(client=client, job=job, on_event=rec)
    pids = _worker_pids(client)
    return {
        "job": job,
        "results": results,
        "recorder": rec,
        "pids": pids,
        "pids_before": pids_before,
        "out": out,
    }


def test_job_after_a_failed_job_runs_on_the_same_workers(first_run, client):
    assert first_run["pids"] == first_run["pids_before"]
    assert len(first_run["pids"]) == 2


def test_ranks_agree_on_final_parameters(first_run):
    results = first_run["results"]
    assert [r.rank for r in results] == [0, 1]
    assert results[0].params_sha256 == results[1].params_sha256
    assert len(results[0].params_sha256) == 64
    assert results[0].steps == results[1].steps > 0
    assert results[1].history == [] and results[1].weights_uri is None


def test_rank0_history_learns(first_run):
    hist = first_run["results"][0].history
    assert [m.epoch for m in hist] == list(range(1, EPOCHS + 1))
    assert hist[-1].train_loss < hist[0].train_loss
    assert hist[-1].val_loss < hist[0].val_loss
    assert hist[-1].val_accuracy > 0.8
    assert all(m.samples_per_s > 0 for m in hist)
    # cosine schedule: lr decays to ~0 at the last step
    assert hist[0].lr > hist[-1].lr
    assert hist[-1].lr == pytest.approx(0.0, abs=1e-9)


def test_steps_follow_steps_per_epoch_on_both_ranks(first_run, manifest_uri):
    spe = steps_per_epoch(load_manifest(manifest_uri), world_size=2, batch_size=BATCH)
    results = first_run["results"]
    assert all(r.steps == spe * EPOCHS for r in results)
    assert [m.step for m in results[0].history] == [spe * e for e in range(1, EPOCHS + 1)]


def test_samples_count_every_row_each_rank_trained_on(first_run, manifest_uri):
    manifest = load_manifest(manifest_uri)
    spe = steps_per_epoch(manifest, world_size=2, batch_size=BATCH)
    rows = [sum(s.rows for s in shards_for_rank(manifest, rank=r, world_size=2)) for r in range(2)]
    per_epoch = sum(min(spe * BATCH, n) for n in rows)
    assert [r.samples for r in first_run["results"]] == [per_epoch * EPOCHS] * 2


def test_weights_file_loads_into_the_model_and_matches_the_hash(first_run, manifest_uri):
    r0, job = first_run["results"][0], first_run["job"]
    assert r0.weights_uri == job.output_uri
    assert os.path.exists(job.output_uri)
    state = st_load(Path(job.output_uri).read_bytes())
    assert _sha_of_state(state) == r0.params_sha256
    model = build_model(spec=job.model, in_features=64, n_classes=10)
    model.load_state_dict(state)  # strict: every key present, shapes match
    x, y = read_shard(load_manifest(manifest_uri).test)
    assert (predict_classes(model=model, x=x) == y).mean() > 0.8


def test_checkpoints_written_every_k_steps_and_pruned_to_the_newest(first_run):
    job, total = first_run["job"], first_run["results"][0].steps
    ckpt = first_run["out"] / "ckpt"
    dirs = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-"))
    spe = total // EPOCHS
    # every K steps and at each epoch's end; only the newest KEEP stay
    written = sorted({*range(EVERY, total + 1, EVERY), *range(spe, total + 1, spe)})
    expected = written[-ckpt_mod.KEEP :]
    assert dirs == [f"step-{s:08d}" for s in expected]
    for s in expected:
        meta = json.loads((ckpt / f"step-{s:08d}" / "meta.json").read_text())
        assert meta["step"] == s
        assert meta["epoch"] == math.ceil(s / spe)
        assert meta["step_in_epoch"] == s - (meta["epoch"] - 1) * spe
        assert len(meta["history"]) == (meta["epoch"] if s % spe == 0 else meta["epoch"] - 1)
        assert (ckpt / f"step-{s:08d}" / "model.safetensors").exists()
    last = (ckpt / f"step-{total:08d}" / "model.safetensors").read_bytes()
    assert last == Path(job.output_uri).read_bytes()
    assert not [p for p in ckpt.rglob(".tmp-*")]


def test_on_event_once_per_epoch_in_calling_thread(first_run):
    rec, hist = first_run["recorder"], first_run["results"][0].history
    epochs = [ev for ev in rec.events if ev["kind"] == "epoch"]
    assert {ev["kind"] for ev in rec.events} <= {"epoch", "progress"}
    assert [ev["epoch"] for ev in epochs] == list(range(1, EPOCHS + 1))
    assert all(ev["epochs"] == EPOCHS for ev in epochs)
    assert rec.threads == {threading.get_ident()}
    for ev, m in zip(epochs, hist, strict=True):
        assert ev["train_loss"] == pytest.approx(m.train_loss)
        assert ev["val_accuracy"] == pytest.approx(m.val_accuracy)
        assert ev["step"] == m.step


def test_second_job_on_same_cluster_leaves_the_workers_alone_and_reproduces(
    first_run, client, manifest_uri, tmp_path
):
    """Back-to-back process groups: each lives in its ranks' own processes, so the second job
    needs no worker restart (the workers keep whatever else they host) and gives the same bits."""
    pids_before = _worker_pids(client)
    assert pids_before == first_run["pids"]

    rec = Recorder()
    results = run_ddp(client=client, job=_job(manifest_uri, tmp_path), on_event=rec)
    assert _worker_pids(client) == pids_before  # the same worker processes
    assert len(client.scheduler_info()["workers"]) == 2
    assert len([ev for ev in rec.events if ev["kind"] == "epoch"]) == EPOCHS
    assert results[0].params_sha256 == results[1].params_sha256
    # same seed, same data, same world size: bit-identical result
    assert results[0].params_sha256 == first_run["results"][0].params_sha256
    assert [m.train_loss for m in results[0].history] == pytest.approx(
        [m.train_loss for m in first_run["results"][0].history], rel=1e-6
    )
    assert (tmp_path / "weights.safetensors").read_bytes() == Path(first_run["job"].output_uri).read_bytes()


def test_train_rank_alone_without_process_group(manifest_uri, tmp_path):
    emitted: list[dict] = []
    job = _job(manifest_uri, tmp_path, epochs=2, checkpoint_every=0)
    res = train_rank(job=job, rank=0, world_size=1, emit=emitted.append)
    assert not torch.distributed.is_initialized()
    spe = steps_per_epoch(load_manifest(manifest_uri), world_size=1, batch_size=BATCH)
    assert res.steps == 2 * spe
    assert [e["epoch"] for e in emitted] == [1, 2]
    assert res.history[-1].train_loss < res.history[0].train_loss
    assert res.history[-1].val_accuracy > 0.8
    state = st_load((tmp_path / "weights.safetensors").read_bytes())
    assert _sha_of_state(state) == res.params_sha256
    # checkpoint_every=0: only at each epoch's end
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"step-{spe:08d}", f"step-{2 * spe:08d}"]


def test_train_rank_is_deterministic_for_a_seed(manifest_uri, tmp_path):
    a = train_rank(job=_job(manifest_uri, tmp_path / "a", epochs=1, seed=3), rank=0, world_size=1)
    b = train_rank(job=_job(manifest_uri, tmp_path / "b", epochs=1, seed=3), rank=0, world_size=1)
    c = train_rank(job=_job(manifest_uri, tmp_path / "c", epochs=1, seed=4), rank=0, world_size=1)
    assert a.params_sha256 == b.params_sha256
    assert a.params_sha256 != c.params_sha256


@pytest.mark.parametrize(("n_shards", "world_size"), [(4, 2), (3, 2), (5, 3), (4, 1)])
def test_steps_per_epoch_is_the_same_for_every_rank(data_root, n_shards, world_size):
    raw = steps.ingest(spec=DataSpec(source="builtin://digits"), root=data_root)
    manifest = load_manifest(
        preprocess_and_shard(
            raw_uri=raw.uri,
            source_sha256=raw.sha256,
            label="label",
            spec=ShardSpec(n_shards=n_shards),
            root=data_root,
        )
    )
    rows = [
        sum(s.rows for s in shards_for_rank(manifest, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    assert sum(rows) == sum(s.rows for s in manifest.train)
    for batch in (1, 7, 32, 10_000):
        spe = steps_per_epoch(manifest, world_size=world_size, batch_size=batch)
        # every rank can run exactly `spe` non-empty steps: the rank with the fewest rows bounds it
        assert spe == max(1, min(math.ceil(n / batch) for n in rows))
        assert all(spe <= math.ceil(n / batch) for n in rows)
        assert all((spe - 1) * batch < n for n in rows)
    if n_shards == 3 and world_size == 2:
        assert rows[0] > rows[1]  # uneven split: the helper still gives one number for both ranks
        assert steps_per_epoch(manifest, world_size=2, batch_size=1) == rows[1]
