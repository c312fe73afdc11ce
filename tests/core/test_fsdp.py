"""FSDP2 training on a real 2-worker Dask LocalCluster (gloo on CPU): sharding, DCP checkpoints,
checksums, consolidation, and bit-exact resume from a fallback checkpoint."""

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from torch import nn

from mms_core.data.shard import load_manifest, read_shard
from mms_core.evaluate import predict_classes
from mms_core.models import ModelSpec, build_model
from mms_core.training.checkpoint import KEEP
from mms_core.training.fsdp import FullyShard, consolidate_checkpoint, run_fsdp, shard_units
from mms_core.training.loop import forward_loss, state_sha256, steps_per_epoch
from mms_core.training.optim import make_optimizer
from mms_core.training.spec import TrainJob, TrainSpec

EPOCHS = 4
EVERY = 15  # with ~20 steps per epoch the second-newest checkpoint lies mid-epoch
BATCH = 32
LR = 1e-2  # 80 steps in all: a high peak rate (cosine to 0) gets the MLP past 0.9


@pytest.fixture(scope="module")
def manifest_uri(digits_manifest):
    return digits_manifest(4)


@pytest.fixture(scope="module")
def client(training_cluster):
    with training_cluster(2) as client:
        yield client


def _job(manifest_uri, out: Path, *, ckpt: Path | None = None) -> TrainJob:
    return TrainJob(
        manifest_uri=manifest_uri,
        model=ModelSpec(name="mlp"),
        train=TrainSpec(strategy="fsdp", epochs=EPOCHS, checkpoint_every=EVERY, batch_size=BATCH, lr=LR),
        output_uri=str(out / "weights.safetensors"),
        checkpoint_uri=str(ckpt or out / "ckpt"),
    )


@pytest.fixture(scope="module")
def first_run(client, manifest_uri, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-run1")
    job = _job(manifest_uri, out)
    events: list[dict] = []
    results = run_fsdp(client=client, job=job, on_event=events.append)
    return {"job": job, "results": results, "events": events, "ckpt": out / "ckpt"}


def _step_dirs(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.iterdir() if p.name.startswith("step-"))


def test_fsdp_learns_digits_and_ranks_agree(first_run, manifest_uri):
    r0, r1 = first_run["results"]
    assert r0.params_sha256 == r1.params_sha256
    assert (
        r0.steps
        == r1.steps
        == steps_per_epoch(load_manifest(manifest_uri), world_size=2, batch_size=BATCH) * EPOCHS
    )
    assert [m.epoch for m in r0.history] == list(range(1, EPOCHS + 1))
    assert r0.history[-1].val_accuracy >= 0.9
    assert r1.history == [] and r1.weights_uri is None


def test_weights_load_into_a_plain_model_and_predict(first_run, manifest_uri):
    r0, job = first_run["results"][0], first_run["job"]
    state = st_load(Path(r0.weights_uri).read_bytes())
    assert state_sha256(state) == r0.params_sha256
    model = build_model(spec=job.model, in_features=64, n_classes=10)
    model.load_state_dict(state)  # strict: the unwrapped model's keys and shapes
    x, y = read_shard(load_manifest(manifest_uri).test)
    assert (predict_classes(model=model, x=x) == y).mean() >= 0.9


def test_each_rank_holds_about_half_the_parameters(first_run):
    stats = [r.stats for r in first_run["results"]]
    total = sum(
        p.numel() for p in build_model(spec=first_run["job"].model, in_features=64, n_classes=10).parameters()
    )
    assert all(s["total_params"] == total and s["fsdp_units"] == 3 for s in stats)  # mlp: 3 Linear
    assert sum(s["local_params"] for s in stats) == total
    assert all(abs(s["local_params"] - total / 2) <= 0.01 * total for s in stats)


def test_checkpoints_are_dcp_shards_with_checksums(first_run):
    dirs = _step_dirs(first_run["ckpt"])
    assert len(dirs) == KEEP
    for d in dirs:
        meta = json.loads((d / "meta.json").read_text())
        shards = sorted(p.name for p in d.glob("*.safetensors"))
        assert len(shards) == 2 and sorted(meta["files"]) == shards  # one shard file per rank
        assert {"step", "epoch", "step_in_epoch", "steps_per_epoch", "history", "param_groups"} <= set(meta)
        assert d.name == f"step-{meta['step']:08d}"


def test_consolidated_checkpoint_equals_the_final_weights(first_run):
    newest = _step_dirs(first_run["ckpt"])[-1]
    full = st_load(consolidate_checkpoint(uri=str(newest)))
    final = st_load(Path(first_run["results"][0].weights_uri).read_bytes())
    assert full.keys() == final.keys()
    assert all(torch.equal(full[k], final[k]) for k in final)


def test_consolidate_refuses_a_corrupt_checkpoint(first_run, tmp_path):
    copy = tmp_path / "step"
    shutil.copytree(_step_dirs(first_run["ckpt"])[-1], copy)
    _flip_a_byte(next(copy.glob("*.safetensors")))
    with pytest.raises(ValueError, match="corrupt"):
        consolidate_checkpoint(uri=str(copy))


def test_corrupt_newest_shard_falls_back_and_resume_is_bit_exact(first_run, client, manifest_uri, tmp_path):
    """The newest checkpoint (the last step) has a damaged shard: the rerun must resume from the
    one before (mid-epoch) and, with model and optimizer restored exactly, end on the same bits."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(first_run["ckpt"], ckpt)
    older, newest = _step_dirs(ckpt)[-2:]
    _flip_a_byte(sorted(newest.glob("*.safetensors"))[1])
    events: list[dict] = []
    results = run_fsdp(client=client, job=_job(manifest_uri, tmp_path, ckpt=ckpt), on_event=events.append)
    resumes = [ev for ev in events if ev["kind"] == "resume"]
    older_meta = json.loads((older / "meta.json").read_text())
    assert [ev["step"] for ev in resumes] == [older_meta["step"]]
    assert 0 < older_meta["step_in_epoch"] < older_meta["steps_per_epoch"]  # mid-epoch resume
    assert {r.params_sha256 for r in results} == {first_run["results"][0].params_sha256}
    assert Path(results[0].weights_uri).read_bytes() == Path(first_run["results"][0].weights_uri).read_bytes()


def test_save_load_round_trip_exact_through_a_remote_store(manifest_uri, tmp_path):
    """No process group (a lone rank) and a non-local URI (memory://, as s3:// would be): DCP writes
    to a staging directory that is uploaded, and reads a downloaded copy."""
    root = f"memory://fsdp-{uuid.uuid4().hex}/ckpt"
    job = _job(manifest_uri, tmp_path).model_copy(update={"checkpoint_uri": root})
    x, y = (torch.tensor(a) for a in read_shard(load_manifest(manifest_uri).val))

    def trained(seed: int, n_steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = FullyShard().wrap(
            build_model(spec=job.model, in_features=64, n_classes=10), job=job, world_size=1
        )
        opt = make_optimizer(model, job.train)
        for i in range(n_steps):
            opt.zero_grad()
            forward_loss(model, x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32])[0].backward()
            opt.step()
        return model, opt

    model, opt = trained(0, 3)
    meta = {
        "step": 3,
        "epoch": 1,
        "step_in_epoch": 3,
        "steps_per_epoch": 9,
        "world_size": 1,
        "samples": 96,
        "history": [],
    }
    FullyShard().save(job=job, rank=0, model=model, optimizer=opt, meta=meta)
    other, other_opt = trained(1, 0)  # different weights, no optimizer state yet
    got = FullyShard().load(job=job, model=other, optimizer=other_opt)
    assert got["uri"] == f"{root}/step-00000003" and got["step"] == 3
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    )
    want, have = opt.state_dict(), other_opt.state_dict()
    assert want["state"].keys() == have["state"].keys()
    for i, per_param in want["state"].items():
        assert all(torch.equal(v, have["state"][i][k]) for k, v in per_param.items())
    assert have["param_groups"][0]["lr"] == want["param_groups"][0]["lr"]
    full = st_load(consolidate_checkpoint(uri=got["uri"]))
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data, past the safetensors header
    path.write_bytes(bytes(data))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(8), nn.Sequential(nn.Linear(8, 8), nn.GELU())


class _TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.wte.weight  # tied


def test_wrap_policy_shards_blocks_or_parameter_layers():
    gpt = _TinyGPT()
    assert shard_units(gpt) == list(gpt.blocks)  # embedding, tied head: the root's group
    cnn = build_model(spec=ModelSpec(name="cnn"), in_features=64, n_classes=10)
    assert [type(u).__name__ for u in shard_units(cnn)] == ["Conv2d", "Conv2d", "Linear", "Linear"]
    tied = nn.Sequential(nn.Embedding(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    assert shard_units(tied) == []
