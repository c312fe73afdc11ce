"""Checkpoints: safetensors model + optimizer state, checksums in meta.json (written last)."""

import json

import pytest
import torch
import torch.nn.functional as F

from mms_core import storage
from mms_core.models import ModelSpec, build_model
from mms_core.training import checkpoint as ckpt
from mms_core.training.checkpoint import load_checkpoint, load_state, save_checkpoint, state_bytes


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(
        spec=ModelSpec(name="mlp", kwargs={"hidden": [16, 8], "dropout": 0.2}), in_features=6, n_classes=3
    )


def _optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-3)
    return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-3)


def _train(model, optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks come from the global generator
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert isinstance(b[k], torch.Tensor), k
            assert a[k].dtype == b[k].dtype, k
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            _assert_state_equal(a[k], b[k])
        else:
            assert a[k] == b[k], k


def _assert_optim_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa["state"]) == sorted(sb["state"])
    assert len(sa["state"]) > 0
    for idx in sa["state"]:
        _assert_state_equal(sa["state"][idx], sb["state"][idx])
    assert len(sa["param_groups"]) == len(sb["param_groups"])
    for ga, gb in zip(sa["param_groups"], sb["param_groups"], strict=True):
        assert ga["params"] == gb["params"]
        assert ga["lr"] == gb["lr"]
        assert ga["weight_decay"] == gb["weight_decay"]


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_round_trip_restores_model_and_optimizer_bit_exactly(tmp_path, kind):
    model = _model(0)
    opt = _optimizer(kind, model)
    _train(model, opt, steps=4)
    root = str(tmp_path / "ckpt")
    out = save_checkpoint(root=root, step=4, epoch=2, model=model, optimizer=opt)
    assert out == f"{root}/step-00000004"

    fresh = _model(123)  # different init: nothing equal by accident
    assert not torch.equal(fresh[0].weight, model[0].weight)
    fresh_opt = _optimizer(kind, fresh)
    meta = load_checkpoint(uri=out, model=fresh, optimizer=fresh_opt)

    assert meta["step"] == 4 and meta["epoch"] == 2
    _assert_state_equal(model.state_dict(), fresh.state_dict())
    _assert_optim_equal(opt, fresh_opt)
    key = "momentum_buffer" if kind == "sgd" else "exp_avg_sq"
    assert all(key in s for s in fresh_opt.state_dict()["state"].values())

    # Resuming from the checkpoint continues exactly like the uninterrupted run.
    _train(model, opt, steps=3, seed=7)
    _train(fresh, fresh_opt, steps=3, seed=7)
    _assert_state_equal(model.state_dict(), fresh.state_dict())
    _assert_optim_equal(opt, fresh_opt)


def test_load_without_optimizer_restores_model_only(tmp_path):
    model = _model(0)
    opt = _optimizer("adamw", model)
    _train(model, opt, steps=2)
    out = save_checkpoint(root=str(tmp_path), step=2, epoch=1, model=model, optimizer=opt)
    fresh = _model(5)
    load_checkpoint(uri=out, model=fresh)
    _assert_state_equal(model.state_dict(), fresh.state_dict())


def test_meta_records_checksums_of_both_files(tmp_path):
    model = _model(0)
    opt = _optimizer("sgd", model)
    _train(model, opt, steps=1)
    out = save_checkpoint(root=str(tmp_path), step=1, epoch=1, model=model, optimizer=opt)
    meta = json.loads((tmp_path / "step-00000001" / "meta.json").read_text())
    assert meta["model_sha256"] == storage.sha256_bytes(storage.read_bytes(f"{out}/model.safetensors"))
    assert meta["optim_sha256"] == storage.sha256_bytes(storage.read_bytes(f"{out}/optim.safetensors"))
    assert meta["param_groups"][0]["momentum"] == 0.9
    # no pickle: both payloads are safetensors (8-byte little-endian header length, then JSON)
    for name in ("model", "optim"):
        raw = (tmp_path / "step-00000001" / f"{name}.safetensors").read_bytes()
        n = int.from_bytes(raw[:8], "little")
        json.loads(raw[8 : 8 + n])


@pytest.mark.parametrize("name", ["model", "optim"])
def test_corrupt_file_fails_load_naming_the_checksum(tmp_path, name):
    model = _model(0)
    opt = _optimizer("adamw", model)
    _train(model, opt, steps=2)
    out = save_checkpoint(root=str(tmp_path), step=2, epoch=1, model=model, optimizer=opt)
    path = tmp_path / "step-00000002" / f"{name}.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # flip bits in the last tensor byte: still parseable, wrong content
    path.write_bytes(bytes(raw))

    fresh = _model(9)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{name}\.safetensors checksum mismatch"):
        load_checkpoint(uri=out, model=fresh, optimizer=_optimizer("adamw", fresh))
    # nothing was loaded from the corrupt checkpoint
    _assert_state_equal(before, fresh.state_dict())


def test_meta_json_is_written_last(tmp_path, monkeypatch):
    order: list[str] = []
    real = storage.write_bytes_atomic

    def recording(uri, data):
        order.append(uri.rsplit("/", 1)[-1])
        return real(uri, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", recording)
    model = _model(0)
    opt = _optimizer("adamw", model)
    _train(model, opt, steps=1)
    save_checkpoint(root=str(tmp_path), step=1, epoch=1, model=model, optimizer=opt)
    assert order[-1] == "meta.json"
    assert set(order) == {"model.safetensors", "optim.safetensors", "meta.json"}


def test_directory_without_meta_json_is_incomplete(tmp_path):
    model = _model(0)
    opt = _optimizer("adamw", model)
    _train(model, opt, steps=1)
    out = save_checkpoint(root=str(tmp_path), step=1, epoch=1, model=model, optimizer=opt)
    (tmp_path / "step-00000001" / "meta.json").unlink()
    assert (tmp_path / "step-00000001" / "model.safetensors").exists()
    with pytest.raises(FileNotFoundError):
        load_checkpoint(uri=out, model=_model(3))


def test_state_bytes_round_trip_and_is_deterministic():
    model = _model(0)
    data = state_bytes(model)
    assert data == state_bytes(model)
    fresh = _model(42)
    load_state(fresh, data)
    _assert_state_equal(model.state_dict(), fresh.state_dict())
    assert ckpt.st_load(data).keys() == model.state_dict().keys()
