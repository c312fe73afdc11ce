"""Checkpoints as safetensors (model + optimizer state), never pickle.

Layout: <root>/step-<N>/{model,optim}.safetensors and meta.json, written last, holding the
sha256 of both files: a checkpoint without a valid meta.json is incomplete and ignored.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from mms_core import storage


def state_bytes(model: nn.Module) -> bytes:
    """Model weights as safetensors bytes (contiguous CPU copies)."""
    return st_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def load_state(model: nn.Module, data: bytes) -> None:
    model.load_state_dict(st_load(data))


def save_checkpoint(
    *, root: str, step: int, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer
) -> str:
    """Write one checkpoint; returns its directory URI."""
    tensors, groups = _flatten_optimizer(optimizer.state_dict())
    out = storage.join(root, f"step-{step:08d}")
    model_sha = storage.write_bytes_atomic(storage.join(out, "model.safetensors"), state_bytes(model))
    optim_sha = storage.write_bytes_atomic(storage.join(out, "optim.safetensors"), st_save(tensors))
    meta = {
        "step": step,
        "epoch": epoch,
        "param_groups": groups,
        "model_sha256": model_sha,
        "optim_sha256": optim_sha,
    }
    storage.write_json_atomic(storage.join(out, "meta.json"), meta)
    return out


def load_checkpoint(
    *, uri: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore model (and optimizer) from a checkpoint directory after checking both checksums."""
    meta = storage.read_json(storage.join(uri, "meta.json"))
    model_data = storage.read_bytes(storage.join(uri, "model.safetensors"))
    optim_data = storage.read_bytes(storage.join(uri, "optim.safetensors"))
    for name, data, want in (
        ("model", model_data, meta["model_sha256"]),
        ("optim", optim_data, meta["optim_sha256"]),
    ):
        if storage.sha256_bytes(data) != want:
            raise ValueError(f"checkpoint {uri}: {name}.safetensors checksum mismatch (corrupt checkpoint)")
    load_state(model, model_data)
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(st_load(optim_data), meta["param_groups"]))
    return meta


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors: dict[str, torch.Tensor] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = t.detach().cpu().contiguous()
    groups = json.loads(json.dumps(sd["param_groups"], default=float))
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    return {"state": state, "param_groups": groups}
