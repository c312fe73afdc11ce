"""The per-rank training loop, shared by every launcher (Dask DDP, torchrun in bench/).

Runs inside an initialised torch.distributed process group (or alone when world_size == 1).
Each rank reads only its own training shards; gradients are all-reduced by DDP.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mms_core import storage
from mms_core.data.shard import Manifest, load_manifest, read_shard, shards_for_rank
from mms_core.models import build_model
from mms_core.training.checkpoint import save_checkpoint, state_bytes
from mms_core.training.spec import EpochMetrics, RankResult, TrainJob, TrainSpec

Emit = Callable[[dict[str, Any]], None]


def steps_per_epoch(manifest: Manifest, *, world_size: int, batch_size: int) -> int:
    """Same on every rank (else the all-reduce would hang): the smallest rank's batch count."""
    rows = [
        sum(s.rows for s in shards_for_rank(manifest, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    return max(1, min(math.ceil(n / batch_size) for n in rows))


def train_rank(*, job: TrainJob, rank: int, world_size: int, emit: Emit | None = None) -> RankResult:
    """Train on this rank's shards; rank 0 validates, checkpoints, emits metrics and saves weights."""
    torch.set_num_threads(job.num_threads)
    torch.manual_seed(job.train.seed)  # same init everywhere; DDP also broadcasts rank 0's weights
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    manifest = load_manifest(job.manifest_uri)
    x, y = _load_rank_data(manifest, rank=rank, world_size=world_size, device=device)
    model = build_model(
        spec=job.model, in_features=len(manifest.features), n_classes=len(manifest.classes)
    ).to(device)
    net: nn.Module = DDP(model) if world_size > 1 else model
    optimizer = _optimizer(model, job.train)
    n_steps = steps_per_epoch(manifest, world_size=world_size, batch_size=job.train.batch_size)
    scheduler = _scheduler(optimizer, job.train, total_steps=n_steps * job.train.epochs)
    val = _to_device(read_shard(manifest.val), device) if rank == 0 else None

    history: list[EpochMetrics] = []
    step, samples, t_start = 0, 0, time.perf_counter()
    for epoch in range(1, job.train.epochs + 1):
        t0 = time.perf_counter()
        totals, step = _train_epoch(
            job=job,
            net=net,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            data=(x, y),
            n_steps=n_steps,
            epoch=epoch,
            rank=rank,
            step=step,
        )
        if world_size > 1:
            dist.all_reduce(totals)
        elapsed = time.perf_counter() - t0
        samples += int(totals[2])
        if rank == 0:
            val_loss, val_acc = _evaluate(model, *val)
            m = EpochMetrics(
                epoch=epoch,
                step=step,
                train_loss=float(totals[0] / totals[2]),
                train_accuracy=float(totals[1] / totals[2]),
                val_loss=val_loss,
                val_accuracy=val_acc,
                samples_per_s=float(totals[2]) / elapsed,
                lr=optimizer.param_groups[0]["lr"],
            )
            history.append(m)
            if emit:
                emit({"kind": "epoch", "epochs": job.train.epochs, **m.model_dump()})
    train_seconds = time.perf_counter() - t_start

    result = RankResult(
        rank=rank,
        params_sha256=params_sha256(model),
        history=history,
        steps=step,
        samples=samples,
        train_seconds=train_seconds,
    )
    if rank == 0:
        save_checkpoint(
            root=job.checkpoint_uri, step=step, epoch=job.train.epochs, model=model, optimizer=optimizer
        )
        storage.write_bytes_atomic(job.output_uri, state_bytes(model))
        result.weights_uri = job.output_uri
    return result


def _load_rank_data(
    manifest: Manifest, *, rank: int, world_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_shard(s) for s in shards_for_rank(manifest, rank=rank, world_size=world_size)]
    return _to_device((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])), device)


def _to_device(xy: tuple[np.ndarray, np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(xy[0], device=device), torch.tensor(xy[1], device=device)


def _train_epoch(
    *,
    job: TrainJob,
    net: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: tuple[torch.Tensor, torch.Tensor],
    n_steps: int,
    epoch: int,
    rank: int,
    step: int,
) -> tuple[torch.Tensor, int]:
    """One pass over this rank's rows; returns (sum of loss*n, correct, n) and the new step count."""
    x, y = data
    net.train()
    gen = torch.Generator().manual_seed(job.train.seed * 100_003 + epoch * 1_009 + rank)
    perm = torch.randperm(len(x), generator=gen).to(x.device)
    # Accumulated on the device: no host sync per step (matters on GPUs).
    totals = torch.zeros(3, dtype=torch.float64, device=x.device)
    for i in range(n_steps):
        idx = perm[i * job.train.batch_size : (i + 1) * job.train.batch_size]
        xb, yb = x[idx], y[idx]
        with _autocast(xb.device, job.train.precision):
            logits = net(xb)
            loss = F.cross_entropy(logits.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        totals[0] += loss.detach() * len(idx)
        totals[1] += (logits.argmax(1) == yb).sum()
        totals[2] += len(idx)
        if rank == 0 and job.train.checkpoint_every and step % job.train.checkpoint_every == 0:
            save_checkpoint(root=job.checkpoint_uri, step=step, epoch=epoch, model=model, optimizer=optimizer)
    return totals, step


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), float((logits.argmax(1) == y).float().mean())


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay)
    fused = next(model.parameters()).is_cuda  # fused AdamW kernels exist on CUDA only
    return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, fused=fused)


def _scheduler(
    optimizer: torch.optim.Optimizer, spec: TrainSpec, *, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if spec.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def params_sha256(model: nn.Module) -> str:
    """sha256 over the state dict in key order: equal on every rank after DDP; the run's fingerprint."""
    h = hashlib.sha256()
    for _, p in sorted(model.state_dict().items()):
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
