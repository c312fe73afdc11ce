"""Parameter-server strategy: the shard layout alone, then whole runs on a real 2-worker Dask
LocalCluster (digits, through the same manifest path as the DDP and fedavg tests)."""

import math
import os
import shutil
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from distributed import wait
from safetensors.torch import load as st_load

from mms_core.data.shard import load_manifest, read_shard, shards_for_rank
from mms_core.errors import TrainingError
from mms_core.evaluate import predict_classes
from mms_core.models import ModelSpec, build_model
from mms_core.training.loop import params_sha256, steps_per_epoch
from mms_core.training.param_server import run_param_server
from mms_core.training.param_server_actor import ServerPlan
from mms_core.training.param_server_worker import epoch_order, plan_shards
from mms_core.training.spec import TrainJob, TrainSpec

NO_DROPOUT = ModelSpec(name="mlp", kwargs={"hidden": [64, 32], "dropout": 0.0})
BATCH = 32

# ---- layout and plan, no cluster ----------------------------------------------------------------


def _mlp(seed: int = 0, spec: ModelSpec = ModelSpec(name="mlp")) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(spec=spec, in_features=64, n_classes=10)


def test_plan_shards_balances_by_size_and_holds_every_parameter_once():
    model = _mlp()  # (128,64) (128,) (64,128) (64,) (10,64) (10,)
    layout = plan_shards(model=model, shards=2)
    assert sorted(i for shard in layout.shards for i in shard) == list(range(6))
    sizes = layout.sizes()
    assert sum(sizes) == sum(p.numel() for p in model.parameters())
    assert max(sizes) / min(sizes) < 1.1  # the two 8192-value matrices land on different shards
    assert all(list(s) == sorted(s) for s in layout.shards)
    # split then load is the identity, also into a differently initialised model
    other = _mlp(seed=1)
    layout.load(other, layout.split(model))
    assert params_sha256(other) == params_sha256(model)
    with pytest.raises(TrainingError, match=r"shards=7 but the model has only 6 parameter tensors"):
        plan_shards(model=model, shards=7)


def test_optimizer_state_split_and_merge_are_inverse():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    F.cross_entropy(model(torch.randn(8, 64)), torch.arange(8)).backward()
    opt.step()
    layout = plan_shards(model=model, shards=3)
    parts = layout.split_optimizer_state(opt.state_dict())
    assert [sorted(p["state"]) for p in parts] == [list(range(len(s))) for s in layout.shards]
    merged = layout.merge_optimizer_states(parts)
    want = opt.state_dict()
    assert merged["param_groups"] == want["param_groups"]
    assert sorted(merged["state"]) == sorted(want["state"])
    for i, per in want["state"].items():
        assert all(torch.equal(merged["state"][i][k], v) for k, v in per.items())


def test_server_plan_counts_versions_and_marks_epoch_ends_and_checkpoints():
    plan = ServerPlan(world_size=3, staleness_bound=None, steps_per_epoch=10, epochs=2, checkpoint_every=4)
    assert plan.versions_per_clock == 3 and plan.total_clocks == 20  # async: one version per push
    assert plan.marks(after=0) == [4, 8, 10, 12, 16, 20]
    assert plan.marks(after=10) == [12, 16, 20]
    sync = ServerPlan(world_size=3, staleness_bound=0, steps_per_epoch=10, epochs=2, checkpoint_every=0)
    assert sync.versions_per_clock == 1 and sync.marks(after=0) == [10, 20]


# ---- whole runs on a LocalCluster ---------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest_uri(digits_manifest):
    return digits_manifest(4)


@pytest.fixture(scope="module")
def client(training_cluster):
    with training_cluster(2) as client:
        yield client


def _job(manifest_uri, out: Path, *, model=NO_DROPOUT, shards=1, bound=None, **train) -> TrainJob:
    spec = {"epochs": 3, "batch_size": BATCH, "checkpoint_every": 0, **train}
    return TrainJob(
        manifest_uri=manifest_uri,
        model=model,
        train=TrainSpec(
            strategy="param_server", param_server={"shards": shards, "staleness_bound": bound}, **spec
        ),
        output_uri=str(out / "weights.safetensors"),
        checkpoint_uri=str(out / "ckpt"),
    )


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.threads: set[int] = set()

    def __call__(self, ev: dict) -> None:
        self.events.append(ev)
        self.threads.add(threading.get_ident())

    def kind(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["kind"] == kind]


def _hist(h: dict[str, int]) -> dict[int, int]:
    return {int(k): v for k, v in h.items()}


ASYNC_EPOCHS = 6


@pytest.fixture(scope="module")
def async_run(client, manifest_uri, tmp_path_factory):
    out = tmp_path_factory.mktemp("ps-async")
    job = _job(manifest_uri, out, model=ModelSpec(name="mlp"), shards=2, epochs=ASYNC_EPOCHS)
    rec = Recorder()
    t0 = time.perf_counter()
    results = run_param_server(client=client, job=job, on_event=rec)
    return {"job": job, "results": results, "rec": rec, "seconds": time.perf_counter() - t0}


def test_fully_async_trains_digits(async_run, manifest_uri):
    results, job = async_run["results"], async_run["job"]
    hist = results[0].history
    assert [m.epoch for m in hist] == list(range(1, ASYNC_EPOCHS + 1))
    # 0.93-0.95 when written (asynchronous: the figure varies a little from run to run)
    assert hist[-1].val_accuracy >= 0.9
    assert hist[-1].train_loss < hist[0].train_loss and hist[-1].val_loss < hist[0].val_loss
    model = build_model(spec=job.model, in_features=64, n_classes=10)
    model.load_state_dict(st_load(Path(job.output_uri).read_bytes()))
    assert params_sha256(model) == results[0].params_sha256
    x, y = read_shard(load_manifest(manifest_uri).test)
    assert (predict_classes(model=model, x=x) == y).mean() >= 0.88


def test_async_results_count_steps_rows_and_pushes(async_run, manifest_uri):
    results = async_run["results"]
    manifest = load_manifest(manifest_uri)
    spe = steps_per_epoch(manifest, world_size=2, batch_size=BATCH)
    assert [r.rank for r in results] == [0, 1]
    assert results[0].params_sha256 == results[1].params_sha256
    assert results[0].weights_uri and results[1].weights_uri is None and results[1].history == []
    assert all(r.steps == spe * ASYNC_EPOCHS for r in results)
    assert [m.step for m in results[0].history] == [spe * e for e in range(1, ASYNC_EPOCHS + 1)]
    rows = [sum(s.rows for s in shards_for_rank(manifest, rank=r, world_size=2)) for r in range(2)]
    assert results[0].samples == ASYNC_EPOCHS * sum(min(spe * BATCH, n) for n in rows)
    stats = results[0].stats
    total = _hist(stats["staleness_histogram"])
    assert sum(total.values()) == 2 * spe * ASYNC_EPOCHS  # one entry per pushed gradient
    assert stats["server_versions"] == 2 * spe * ASYNC_EPOCHS and stats["shards"] == 2
    per_rank = [_hist(r.stats["rank_staleness_histogram"]) for r in results]
    assert all(sum(h.values()) == spe * ASYNC_EPOCHS for h in per_rank)
    assert results[1].stats["staleness_histogram"] == stats["staleness_histogram"]


def test_async_events_in_calling_thread(async_run):
    rec, hist = async_run["rec"], async_run["results"][0].history
    assert rec.threads == {threading.get_ident()}
    epochs = rec.kind("epoch")
    assert [e["epoch"] for e in epochs] == [m.epoch for m in hist]
    assert all(e["epochs"] == ASYNC_EPOCHS for e in epochs)
    assert [e["val_accuracy"] for e in epochs] == [m.val_accuracy for m in hist]
    stale = rec.kind("staleness")
    assert [e["epoch"] for e in stale] == [m.epoch for m in hist]
    summed: dict[int, int] = {}
    for e in stale:
        for k, v in _hist(e["histogram"]).items():
            summed[k] = summed.get(k, 0) + v
    assert summed == _hist(async_run["results"][0].stats["staleness_histogram"])
    # cosine schedule over the server's versions: decays to 0 at the last one
    assert hist[0].lr > hist[-1].lr and hist[-1].lr == pytest.approx(0.0, abs=1e-9)


# -- staleness bound 0 is synchronous SGD ---------------------------------------------------------


def _sync_sgd_reference(manifest_uri, job: TrainJob, *, reduce: str = "mean") -> dict[str, torch.Tensor]:
    """Plain synchronous data-parallel SGD in one process: per step, each rank's gradient on its
    next batch (same rows, same order as the workers), averaged (or summed, to show the test can
    tell), then one step of the job's optimizer with the cosine schedule."""
    manifest, train = load_manifest(manifest_uri), job.train
    data = []
    for r in range(2):
        parts = [read_shard(s) for s in shards_for_rank(manifest, rank=r, world_size=2)]
        data.append(tuple(torch.cat([torch.from_numpy(p[i].copy()) for p in parts]) for i in (0, 1)))
    spe = steps_per_epoch(manifest, world_size=2, batch_size=BATCH)
    total = spe * train.epochs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the workers: the same matmul kernels, the same rounding
    torch.manual_seed(train.seed)
    model = build_model(spec=job.model, in_features=64, n_classes=10)
    if train.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=0.9, weight_decay=train.weight_decay)
    step = 0
    try:
        for epoch in range(1, train.epochs + 1):
            orders = [
                epoch_order(n_rows=len(d[0]), seed=train.seed, epoch=epoch, rank=r)
                for r, d in enumerate(data)
            ]
            for i in range(spe):
                grads = []
                for (x, y), order in zip(data, orders, strict=True):
                    idx = order[i * BATCH : (i + 1) * BATCH]
                    model.zero_grad()
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
                    grads.append([p.grad.clone() for p in model.parameters()])
                for p, g0, g1 in zip(model.parameters(), *grads, strict=True):
                    p.grad = (g0 + g1) / 2 if reduce == "mean" else g0 + g1
                for g in opt.param_groups:
                    g["lr"] = train.lr * 0.5 * (1 + math.cos(math.pi * step / total))
                opt.step()
                step += 1
    finally:
        torch.set_num_threads(threads)
    return model.state_dict()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# Tolerance for "matches synchronous SGD": both sides do the same float32 operations in the same
# order (data, init, rank-order averaging, optimizer arithmetic, lr per step), so they agreed to
# the bit when written. 1e-5 only leaves room for a last-bit difference should the worker and
# this process pick different CPU kernels; over ~60 small steps such noise stays below ~1e-6,
# while a real mismatch (a summed gradient, a skipped or reordered step, a wrong lr) moves
# weights by 1e-3 or more (checked below for the summed gradient).
MATCH_ATOL = 1e-5


@pytest.fixture(scope="module")
def sync_run(client, manifest_uri, tmp_path_factory):
    out = tmp_path_factory.mktemp("ps-sync")
    job = _job(manifest_uri, out, bound=0, checkpoint_every=7)
    rec = Recorder()
    return {
        "job": job,
        "results": run_param_server(client=client, job=job, on_event=rec),
        "rec": rec,
        "out": out,
    }


def test_staleness_bound_zero_matches_synchronous_sgd(sync_run, manifest_uri):
    job, result = sync_run["job"], sync_run["results"][0]
    want = _sync_sgd_reference(manifest_uri, job)
    assert _max_diff(st_load(Path(job.output_uri).read_bytes()), want) <= MATCH_ATOL
    torch.manual_seed(0)
    init = build_model(spec=job.model, in_features=64, n_classes=10).state_dict()
    assert _max_diff(want, init) > 0.05  # training moved the weights
    assert _hist(result.stats["staleness_histogram"]) == {0: 2 * result.steps}


def test_staleness_bound_zero_with_sgd_momentum_and_two_shards_matches_synchronous_sgd(
    client, manifest_uri, tmp_path
):
    job = _job(manifest_uri, tmp_path, bound=0, shards=2, optimizer="sgd", lr=0.05, epochs=2)
    run_param_server(client=client, job=job)
    got = st_load(Path(job.output_uri).read_bytes())
    assert _max_diff(got, _sync_sgd_reference(manifest_uri, job)) <= MATCH_ATOL
    # unlike AdamW, SGD is not scale-invariant: the summed gradient gives another run
    assert _max_diff(got, _sync_sgd_reference(manifest_uri, job, reduce="sum")) > 1e-3


def test_two_shards_give_the_same_run_as_one(sync_run, client, manifest_uri, tmp_path):
    """With bound 0 the run is deterministic, so splitting the parameters must not change a bit."""
    one = sync_run["results"][0]
    two = run_param_server(client=client, job=_job(manifest_uri, tmp_path, shards=2, bound=0))[0]
    assert one.stats["shards"] == 1 and two.stats["shards"] == 2
    assert two.params_sha256 == one.params_sha256
    assert [m.val_loss for m in two.history] == [m.val_loss for m in one.history]


# -- bounded staleness with a slow worker -----------------------------------------------------------


@pytest.fixture(scope="module")
def slow_model(client, tmp_path_factory):
    """A user model whose forward sleeps on a worker whose MMS_TEST_SLOW_S is set: one slow rank."""
    where = tmp_path_factory.mktemp("ps-user-model")
    name = f"mms_ps_slow_{uuid.uuid4().hex[:8]}"
    (where / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import os, time
            from torch import nn
            from mms_core.models.zoo import mlp

            class Slow(nn.Module):
                def __init__(self, inner):
                    super().__init__()
                    self.inner = inner

                def forward(self, x):
                    if os.environ.get("MMS_TEST_FAIL"):
                        raise RuntimeError("injected failure on this worker")
                    time.sleep(float(os.environ.get("MMS_TEST_SLOW_S", "0")))
                    return self.inner(x)

            def build(*, in_features, n_classes):
                return Slow(mlp(in_features=in_features, n_classes=n_classes, hidden=(32,), dropout=0.0))
            """
        )
    )

    def on_path(path: str, add: bool) -> None:
        # Nested, so it pickles by value (workers cannot import this test module); and not
        # sys.path.insert itself, which would pickle a copy of the driver's list.
        if add:
            sys.path.insert(0, path)
        else:
            sys.path.remove(path)

    sys.path.insert(0, str(where))
    client.run(on_path, str(where), True)
    slow_worker = sorted(client.scheduler_info()["workers"])[1]
    try:
        yield {"spec": ModelSpec(name=f"{name}:build"), "worker": slow_worker}
    finally:
        sys.path.remove(str(where))
        client.run(on_path, str(where), False)


def _set_env(client, worker, **env):
    def apply(values):
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    client.run(apply, env, workers=[worker])


@pytest.fixture
def one_slow_worker(client, slow_model):
    _set_env(client, slow_model["worker"], MMS_TEST_SLOW_S="0.05")
    try:
        yield slow_model["spec"]
    finally:
        _set_env(client, slow_model["worker"], MMS_TEST_SLOW_S=None)


@pytest.mark.parametrize("bound", [None, 1, 3])
def test_no_gradient_is_staler_than_the_bound(client, manifest_uri, tmp_path, one_slow_worker, bound):
    rec = Recorder()
    job = _job(manifest_uri, tmp_path, model=one_slow_worker, bound=bound, epochs=1, lr=5e-3)
    result = run_param_server(client=client, job=job, on_event=rec)[0]
    hist = _hist(result.stats["staleness_histogram"])
    assert sum(hist.values()) == 2 * result.steps
    assert _hist(rec.kind("staleness")[0]["histogram"]) == hist
    if bound is None:
        # the fast rank pushes ~4 gradients per slow one; each slow gradient is that many behind
        assert max(hist) >= 3, hist
    else:
        assert max(hist) == bound, hist  # the fast rank runs as far ahead as it may, no further
    assert result.history[-1].val_accuracy > 0.5


def test_a_failing_worker_fails_the_run_and_releases_the_others(client, manifest_uri, tmp_path, slow_model):
    _set_env(client, slow_model["worker"], MMS_TEST_FAIL="1")
    try:
        t0 = time.perf_counter()
        # bound 0: the healthy rank would wait for the failed one's gradients for ever
        with pytest.raises(TrainingError, match=r"param_server worker 1 failed.*injected failure"):
            run_param_server(
                client=client, job=_job(manifest_uri, tmp_path, model=slow_model["spec"], bound=0)
            )
        assert time.perf_counter() - t0 < 30
    finally:
        _set_env(client, slow_model["worker"], MMS_TEST_FAIL=None)
    assert not (tmp_path / "weights.safetensors").exists()
    # both worker threads are free again: a small task runs at once on each
    futures = [client.submit(os.getpid, workers=[w], pure=False) for w in client.scheduler_info()["workers"]]
    wait(futures, timeout=10)
    assert len(set(client.gather(futures))) == 2


def test_world_size_larger_than_the_cluster_raises(client, manifest_uri, tmp_path):
    with pytest.raises(TrainingError, match=r"world_size=3.*2 workers"):
        run_param_server(client=client, job=_job(manifest_uri, tmp_path, world_size=3))


# -- checkpoints and resume -----------------------------------------------------------------------


def test_checkpoints_every_k_steps_and_at_epoch_ends(sync_run):
    result, ckpt = sync_run["results"][0], sync_run["out"] / "ckpt"
    spe = result.steps // 3
    marks = sorted({*range(7, result.steps + 1, 7), *range(spe, result.steps + 1, spe)})
    kept = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-"))
    assert kept == [f"step-{s:08d}" for s in marks[-3:]]  # checkpoint.KEEP newest
    last = ckpt / f"step-{result.steps:08d}" / "model.safetensors"
    assert last.read_bytes() == Path(sync_run["job"].output_uri).read_bytes()


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(sync_run, client, tmp_path):
    """Cut the finished run back to its newest mid-epoch checkpoint: resuming from it must give
    the same final parameters (bound 0 is deterministic), with the earlier epochs' history."""
    done = sync_run["results"][0]
    shutil.copytree(sync_run["out"] / "ckpt", tmp_path / "ckpt")
    steps_kept = sorted(int(p.name[5:]) for p in (tmp_path / "ckpt").iterdir())
    shutil.rmtree(tmp_path / "ckpt" / f"step-{steps_kept[-1]:08d}")  # the final one
    resume_at = steps_kept[-2]
    assert resume_at % (done.steps // 3) != 0  # a mid-epoch checkpoint (7 does not divide the epoch)

    rec = Recorder()
    job = sync_run["job"].model_copy(
        update={"output_uri": str(tmp_path / "weights.safetensors"), "checkpoint_uri": str(tmp_path / "ckpt")}
    )
    result = run_param_server(client=client, job=job, on_event=rec)[0]
    assert rec.kind("resume") == [
        {"kind": "resume", "step": resume_at, "epoch": 3, "skip": resume_at % (done.steps // 3)}
    ]
    assert [e["epoch"] for e in rec.kind("epoch")] == [3]
    assert result.params_sha256 == done.params_sha256
    assert result.history[:2] == done.history[:2]
    assert result.history[2].val_loss == done.history[2].val_loss

    # A rerun of the finished run trains nothing: same weights and history, straight from the checkpoint.
    rec = Recorder()
    again = run_param_server(client=client, job=job, on_event=rec)[0]
    assert rec.kind("epoch") == [] and rec.kind("resume")[0]["step"] == done.steps
    assert again.params_sha256 == done.params_sha256 and again.history == result.history


def test_killing_a_worker_mid_run_restarts_from_the_last_checkpoint_with_the_same_result(
    sync_run, client, tmp_path, kill_worker
):
    """SIGKILL one of the two workers at the end of epoch 1: its shard's state is gone, so the
    driver closes the other shard (ending the surviving worker task) and resumes from the last
    checkpoint; the surviving worker is not restarted. Bound 0 is deterministic and the nanny
    brings the killed worker back (same world size), so the run ends bit-identical."""
    done = sync_run["results"][0]
    job = sync_run["job"].model_copy(
        update={"output_uri": str(tmp_path / "weights.safetensors"), "checkpoint_uri": str(tmp_path / "ckpt")}
    )
    killed: list[int] = []
    rec = Recorder()
    pids = client.run(os.getpid)

    def on_event(ev: dict) -> None:
        rec(ev)
        if ev["kind"] == "epoch" and not killed:
            killed.append(kill_worker(client))

    result = run_param_server(client=client, job=job, on_event=on_event)[0]
    assert killed
    survivor = next(addr for addr, pid in pids.items() if pid != killed[0])
    assert client.run(os.getpid)[survivor] == pids[survivor]
    [restart] = rec.kind("restart")
    assert "left the cluster" in restart["reason"]
    [resume] = rec.kind("resume")
    assert 0 < resume["step"] == restart["last_step"]  # only steps after the last checkpoint repeat
    assert [m.epoch for m in result.history] == [1, 2, 3]
    assert result.params_sha256 == done.params_sha256
    assert [m.val_loss for m in result.history] == [m.val_loss for m in done.history]
