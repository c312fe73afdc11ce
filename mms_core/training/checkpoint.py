"""Checkpoints as safetensors (model + optimizer state), never pickle, for every strategy.

Layout: <root>/step-<N>/{model,optim}.safetensors and meta.json, written last, holding the
sha256 of both files: a checkpoint without a valid meta.json is incomplete and ignored, and one
whose files do not match their checksums is corrupt; ``load_latest_checkpoint`` then falls back
to the one before. Only the newest ``KEEP`` checkpoints are kept.

Sharded checkpoints (FSDP: one safetensors file per rank, written by torch.distributed.checkpoint)
share the layout and the rules; their meta.json lists every shard file's sha256. The file
plumbing for them is here too (hash shares, local staging for remote stores); the collective
save and load are in fsdp.py. The resume data every strategy keeps (``progress_meta``) and the
position it resumes from (``resume_point``) are here as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from mms_core import storage

KEEP = 3  # checkpoints kept per run: the newest, plus fallbacks if it turns out corrupt
SHARD_SUFFIX = ".safetensors"
_STEP_DIR = re.compile(r"step-(\d{8})$")
log = logging.getLogger(__name__)


def state_bytes(model: nn.Module | dict[str, torch.Tensor]) -> bytes:
    """Model weights (a module, or a state dict) as safetensors bytes (contiguous CPU copies)."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return st_save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def load_state(model: nn.Module, data: bytes) -> None:
    model.load_state_dict(st_load(data))


def save_checkpoint(
    *,
    root: str,
    step: int,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write one checkpoint and prune all but the newest ``KEEP``; returns its directory URI.

    ``extra`` (JSON-serialisable: resume position, history, ...) is stored in meta.json and
    returned by the loaders under the same keys.
    """
    tensors, groups = _flatten_optimizer(optimizer.state_dict())
    out = storage.join(root, f"step-{step:08d}")
    model_sha = storage.write_bytes_atomic(storage.join(out, "model.safetensors"), state_bytes(model))
    optim_sha = storage.write_bytes_atomic(storage.join(out, "optim.safetensors"), st_save(tensors))
    meta = {
        **(extra or {}),
        "step": step,
        "epoch": epoch,
        "param_groups": groups,
        "model_sha256": model_sha,
        "optim_sha256": optim_sha,
    }
    storage.write_json_atomic(storage.join(out, "meta.json"), meta)
    prune_checkpoints(root, keep=KEEP)
    return out


def progress_meta(
    *, step_in_epoch: int, steps_per_epoch: int, world_size: int, samples: int, history: list
) -> dict[str, Any]:
    """The resume data every strategy stores in a checkpoint's meta.json (``history``: EpochMetrics)."""
    return {
        "step_in_epoch": step_in_epoch,
        "steps_per_epoch": steps_per_epoch,
        "world_size": world_size,
        "samples": samples,
        "history": [m.model_dump() for m in history],
    }


def resume_point(meta: dict[str, Any], *, steps_per_epoch: int) -> tuple[int, int]:
    """(epoch to run, steps of it already done) after the checkpoint with ``meta``. Mid-epoch on
    another world size the epoch has another step count: the fraction done is kept."""
    if meta["step_in_epoch"] >= meta["steps_per_epoch"]:
        return meta["epoch"] + 1, 0
    return meta["epoch"], meta["step_in_epoch"] * steps_per_epoch // meta["steps_per_epoch"]


def clear_checkpoints(root: str) -> None:
    """Delete every checkpoint under ``root`` (a run that must not resume from an earlier one's)."""
    storage.remove_tree(root)


def list_checkpoints(root: str) -> list[str]:
    """Checkpoint directories under ``root`` that have a meta.json, oldest first."""
    fs, path = storage.fs_and_path(root)
    if not fs.exists(path):
        return []
    steps = sorted(
        m.group(0)
        for entry in fs.ls(path, detail=False)
        if (m := _STEP_DIR.search(entry.rstrip("/"))) and fs.exists(f"{entry.rstrip('/')}/meta.json")
    )
    return [storage.join(root, name) for name in steps]


def prune_checkpoints(root: str, *, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (complete ones; partial dirs are left)."""
    fs, _ = storage.fs_and_path(root)
    for uri in list_checkpoints(root)[:-keep]:
        fs.rm(storage.fs_and_path(uri)[1], recursive=True)


def load_latest_checkpoint(
    *, root: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any] | None:
    """Restore the newest checkpoint that passes its checksums; None when there is none.

    A corrupt or unreadable checkpoint is logged and skipped, so training resumes from the one
    before it rather than failing or starting over.
    """
    for uri in reversed(list_checkpoints(root)):
        try:
            meta = load_checkpoint(uri=uri, model=model, optimizer=optimizer)
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            log.warning("skipping checkpoint %s: %s", uri, exc)
            continue
        return {**meta, "uri": uri}
    return None


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


# ---- sharded checkpoints (one file per rank) ------------------------------------------------


def verified_sharded_meta(local: str, *, rank: int, world_size: int) -> dict | None:
    """This rank's verdict on a sharded checkpoint: meta.json readable, exactly its shard files
    present, and this rank's share of them (every world_size-th) matching their sha256."""
    try:
        meta = storage.read_json(storage.join(local, "meta.json"))
        present = sorted(shard_files(local))
        if present != sorted(meta["files"]):
            return None
        for name in present[rank::world_size]:
            if storage.sha256_file(storage.join(local, name)) != meta["files"][name]:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def hash_share(uri: str, *, rank: int, world_size: int) -> dict[str, str]:
    """sha256 of every world_size-th shard file of a checkpoint: the ranks share the hashing."""
    names = sorted(shard_files(uri))
    return {n: storage.sha256_file(storage.join(uri, n)) for n in names[rank::world_size]}


def shard_files(uri: str) -> list[str]:
    fs, path = storage.fs_and_path(uri)
    entries = fs.ls(path, detail=False) if fs.exists(path) else []
    return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.endswith(SHARD_SUFFIX)]


@contextlib.contextmanager
def writable_dir(uri: str) -> Iterator[str]:
    """A local directory for a writer that takes local paths only (DCP's); for s3:// and other
    remote stores a private staging directory whose files (this rank's own) are uploaded after."""
    fs, path = storage.fs_and_path(uri)
    if storage.is_local(uri):
        fs.makedirs(path, exist_ok=True)
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="mms-dcp-")
    try:
        yield tmp
        fs.put(f"{tmp}/", path.rstrip("/") + "/", recursive=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def readable_dir(uri: str) -> Iterator[str]:
    """A local path holding the checkpoint: the directory itself, or a downloaded copy (DCP's
    safetensors reader opens local files only; every rank may need every shard to reshard)."""
    fs, path = storage.fs_and_path(uri)
    if storage.is_local(uri):
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="mms-dcp-")
    try:
        for entry in fs.ls(path, detail=False):
            fs.get(entry, f"{tmp}/{entry.rstrip('/').rsplit('/', 1)[-1]}")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
