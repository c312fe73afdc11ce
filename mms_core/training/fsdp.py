"""Fully sharded data parallel (torch FSDP2 ``fully_shard``) on a Dask cluster.

One rank per Dask worker (launch.py), the per-rank loop of loop.py; each rank holds only its
shard (dim-0 slice) of every parameter, gradient and optimizer state. Parameters are
all-gathered per unit just before its forward/backward and freed after; gradients are
reduce-scattered.

Wrap policy (``shard_units``): a model with an ``nn.ModuleList`` (transformer ``blocks`` /
``layers``) is sharded block by block, and everything else (embeddings, final norm, head, tied
weights) goes into the root's group, as torchtitan does. Without one (the zoo's ``mlp`` and
``cnn``), every module that owns parameters directly (Linear, Conv2d, norms) is a unit. A
parameter shared by two modules stays in the root's group.

Checkpoints are torch.distributed.checkpoint (DCP) saves in its safetensors layout
(``HuggingFaceStorageWriter``): every rank writes its own shard file, with each tensor's offset
in the safetensors header, so nothing is pickled. Layout ``<root>/step-<N>/shard-*.safetensors``
plus meta.json, written last by rank 0, holding the resume data, the optimizer's param groups
and the sha256 of every shard file. A checkpoint whose files do not match is skipped and the one
before it used (every rank checks a share of the files; they agree through an all-reduce). DCP
reshards on load, so a run may resume on another world size. ``consolidate_checkpoint`` turns a
checkpoint into one safetensors file of full weights without a process group.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from distributed import Client
from safetensors.torch import save as st_save
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from mms_core import storage
from mms_core.errors import TrainingError
from mms_core.training import loop
from mms_core.training.checkpoint import (
    KEEP,
    hash_share,
    list_checkpoints,
    prune_checkpoints,
    readable_dir,
    verified_sharded_meta,
    writable_dir,
)
from mms_core.training.launch import run_process_group
from mms_core.training.spec import RankResult, TrainJob

log = logging.getLogger(__name__)


def run_fsdp(
    *,
    client: Client,
    job: TrainJob,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> list[RankResult]:
    """Train ``job`` with FSDP2 across the cluster's workers; returns every rank's result (rank order).

    Args:
        client: a connected Dask client (built by the caller).
        job: the training job; ``job.train.world_size`` ranks (default: all workers), settings in
            ``job.train.fsdp``.
        on_event: called in this thread with each event from rank 0 (epoch metrics, progress,
            resume and restart notices).

    Each result's ``stats`` holds the rank's share of the parameters (``local_params`` of
    ``total_params``). Rank 0 writes the full weights to ``job.output_uri`` (safetensors).
    """
    return run_process_group(client=client, job=job, rank_fn=fsdp_rank, on_event=on_event)


def fsdp_rank(job: TrainJob, *, rank: int, world_size: int, emit: Callable | None = None) -> RankResult:
    """One FSDP rank (runs inside the process group)."""
    parallel = FullyShard()
    result = loop.train_rank(job=job, rank=rank, world_size=world_size, emit=emit, parallel=parallel)
    result.stats = {**result.stats, **parallel.stats}
    return result


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that get their own FSDP group (the wrap policy, see the module docstring)."""
    uses = Counter(id(p) for m in model.modules(remove_duplicate=False) for p in m.parameters(recurse=False))

    def owns_unshared(m: nn.Module) -> bool:
        params = list(m.parameters(recurse=False))
        return bool(params) and all(uses[id(p)] == 1 for p in params)

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if lists:
        units = [b for ml in lists for b in ml if any(True for _ in b.parameters())]
    else:
        units = [m for m in model.modules() if m is not model and owns_unshared(m)]
    # Nested lists (blocks holding ModuleLists) would give a unit inside a unit: keep the outer.
    inner = {id(s) for u in units for s in u.modules() if s is not u}
    return [u for u in units if id(u) not in inner]


class FullyShard:
    """FSDP2: ``fully_shard`` per unit, then the root; sharded DCP checkpoints (see module doc).

    ``stats`` is filled by ``wrap``: units, this rank's parameter count and the total.
    """

    # Every forward all-gathers, so a forward on one rank alone would hang: the loop validates
    # on all ranks when this is set.
    collective_forward = True

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}

    def wrap(self, model: nn.Module, *, job: TrainJob, world_size: int) -> nn.Module:
        """Shard ``model`` in place: each of ``shard_units(model)``, then the root.

        Units free their gathered parameters after forward when
        ``job.train.fsdp.reshard_after_forward``; the root keeps its own (FSDP's default: backward
        needs them first). ``precision: bf16`` gathers and computes in bf16 and reduce-scatters
        gradients in fp32; the sharded master weights and optimizer state stay fp32.
        """
        if world_size == 1 or not _distributed():  # a lone rank: nothing to shard over
            self.stats = _param_stats(model, units=0)
            return model
        mp = MixedPrecisionPolicy()
        if job.train.precision == "bf16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        units = shard_units(model)
        for unit in units:  # bottom-up: a group takes the parameters no inner group has taken
            fully_shard(unit, reshard_after_forward=job.train.fsdp.reshard_after_forward, mp_policy=mp)
        fully_shard(model, mp_policy=mp)  # root: FSDP keeps its params gathered until backward
        self.stats = _param_stats(model, units=len(units))
        return model

    def save(
        self, *, job: TrainJob, rank: int, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict
    ) -> None:
        """Write ``<checkpoint_uri>/step-<N>`` (collective): shards, then meta.json; keep the newest KEEP."""
        out = storage.join(job.checkpoint_uri, f"step-{meta['step']:08d}")
        msd, osd = get_state_dict(model, optimizer)
        if rank == 0:  # shards of an earlier, interrupted save (maybe another world size) would mix in
            storage.remove_tree(out)
        _barrier()
        with writable_dir(out) as local, _lone_rank_quiet():
            dcp.save(
                {"model": msd, "optim": osd["state"]},
                storage_writer=HuggingFaceStorageWriter(local, save_distributed=True),
                no_dist=not _distributed(),
            )
        _barrier()
        files = _gather_dicts(hash_share(out, rank=rank, world_size=_world_size()))
        if rank == 0:
            groups = json.loads(json.dumps(osd["param_groups"], default=float))
            storage.write_json_atomic(
                storage.join(out, "meta.json"), {**meta, "param_groups": groups, "files": files}
            )
            prune_checkpoints(job.checkpoint_uri, keep=KEEP)
        self._eval_forward_seen = False

    def load(self, *, job: TrainJob, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """Restore the newest checkpoint every rank finds intact (collective); its meta and ``uri``,
        or None when there is none. Raises TrainingError when an intact one does not fit the model."""
        rank = dist.get_rank() if _distributed() else 0
        candidates = _broadcast(list(reversed(list_checkpoints(job.checkpoint_uri))) if rank == 0 else None)
        for uri in candidates:
            with readable_dir(uri) as local:
                meta = verified_sharded_meta(local, rank=rank, world_size=_world_size())
                if not _all_true(meta is not None):
                    log.warning("skipping checkpoint %s: missing or corrupt shard files", uri)
                    continue
                # Only now: get_state_dict gives a fresh optimizer a state (one zero-gradient step
                # at lr 0) for the checkpoint to overwrite; a run with no checkpoint must not get one.
                msd, osd = get_state_dict(model, optimizer)
                state = {"model": msd, "optim": osd["state"]}
                try:
                    with _lone_rank_quiet():
                        reader = HuggingFaceStorageReader(local)
                        dcp.load(state, storage_reader=reader, no_dist=not _distributed())
                except Exception as exc:  # DCP wraps per-rank failures in CheckpointException
                    raise TrainingError(f"checkpoint {uri} does not fit this model: {exc}") from exc
                set_state_dict(
                    model,
                    optimizer,
                    model_state_dict=state["model"],
                    optim_state_dict={"state": state["optim"], "param_groups": meta["param_groups"]},
                )
                return {**meta, "uri": uri}
        return None

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full weights on CPU under the plain model's keys (collective)."""
        # Gathered one tensor at a time on every rank (not only rank 0, as cpu_offload would),
        # so every rank's params_sha256 covers the same full weights.
        state = get_model_state_dict(model)
        return {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().contiguous()
            for k, v in state.items()
        }


def consolidate_checkpoint(*, uri: str) -> bytes:
    """One checkpoint directory (``<root>/step-<N>``) as a single safetensors file of full weights.

    Needs no process group: DCP reads every shard and places it at its offset. The keys are the
    plain model's ``state_dict`` keys, so the bytes load into ``build_model(...)``.

    Raises:
        ValueError: the checkpoint is incomplete or a shard file does not match its checksum.
    """
    with readable_dir(uri) as local:
        if verified_sharded_meta(local, rank=0, world_size=1) is None:
            raise ValueError(f"checkpoint {uri}: missing meta.json or a corrupt shard file")
        reader = HuggingFaceStorageReader(local)
        tensors = {
            k: torch.empty(m.size, dtype=m.properties.dtype)
            for k, m in reader.read_metadata().state_dict_metadata.items()
            if k.startswith("model.")
        }
        with _lone_rank_quiet():
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(local), no_dist=True)
    return st_save({k.removeprefix("model."): v.contiguous() for k, v in sorted(tensors.items())})


def _param_stats(model: nn.Module, *, units: int) -> dict[str, Any]:
    params = list(model.parameters())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
    total = sum(p.numel() for p in params)  # a DTensor's numel is the global one
    return {"fsdp_units": units, "local_params": local, "total_params": total}


@contextlib.contextmanager
def _lone_rank_quiet() -> Iterator[None]:
    """DCP warns that it assumes a single process when there is no process group: so do we."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (small JSON-like values: checkpoint URIs)."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_dicts(part: dict[str, str]) -> dict[str, str]:
    """The union of every rank's ``part`` (on every rank)."""
    if not _distributed():
        return dict(part)
    parts: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in (p or {}).items()}


def _all_true(flag: bool) -> bool:
    """True only when ``flag`` holds on every rank, so all ranks pick the same checkpoint."""
    if not _distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


__all__ = ["FullyShard", "consolidate_checkpoint", "fsdp_rank", "run_fsdp", "shard_units"]
