"""The per-rank training loop, shared by the process-group strategies (ddp, hierarchical, fsdp)
and by torchrun in bench/.

Runs inside an initialised torch.distributed process group (or alone when world_size == 1).
Each rank reads only its own training shards (``mms_core.data.stream``: whole, or streamed
through a shuffle buffer). How the model is wrapped (DDP, DDP with a hierarchical comm hook,
FSDP2) and how its state is checkpointed is the strategy's ``Parallelism``; the loop owns the
order of work: resume, train, validate, checkpoint.

Resume: when ``job.checkpoint_uri`` holds a valid checkpoint (and ``training.resume``), the loop
restores model, optimizer, schedule position, history and the step within the epoch, so a
restarted run repeats at most the steps since the last checkpoint. Dropout is seeded per step,
so a resumed run on the same world size is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mms_core import storage
from mms_core.data.shard import load_manifest
from mms_core.data.stream import Batch, RankData, ValSet, open_rank_data, steps_per_epoch
from mms_core.models import build_model
from mms_core.training.checkpoint import (
    load_latest_checkpoint,
    progress_meta,
    resume_point,
    save_checkpoint,
    state_bytes,
)
from mms_core.training.mfu import mfu
from mms_core.training.optim import make_optimizer, make_scheduler, seek_schedule
from mms_core.training.spec import EpochMetrics, RankResult, TrainJob

Emit = Callable[[dict[str, Any]], None]
PROGRESS_EVERY_S = 0.5  # rank 0 reports its step this often: the launcher's count of repeated steps


class Parallelism(Protocol):
    """What a process-group strategy decides; the loop calls these on every rank.

    A class attribute ``collective_forward = True`` says a forward pass is a collective (FSDP),
    so every rank runs validation, not rank 0 alone.
    """

    def wrap(self, model: nn.Module, *, job: TrainJob, world_size: int) -> nn.Module:
        """The module to run forward/backward through (may modify ``model`` in place)."""

    def save(
        self, *, job: TrainJob, rank: int, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict
    ) -> None:
        """Write a checkpoint (collective); ``meta`` holds ``step``, ``epoch`` and the resume data."""

    def load(self, *, job: TrainJob, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """Restore the newest valid checkpoint (collective); its meta, or None when there is none."""

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full, unsharded state dict on CPU (collective), on every rank: each rank hashes it,
        rank 0 writes it."""


class Replicated:
    """DDP: every rank holds the whole model; rank 0 writes safetensors checkpoints."""

    def wrap(self, model: nn.Module, *, job: TrainJob, world_size: int) -> nn.Module:
        return DDP(model) if world_size > 1 else model

    def save(
        self, *, job: TrainJob, rank: int, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict
    ) -> None:
        if rank == 0:
            save_checkpoint(
                root=job.checkpoint_uri,
                step=meta["step"],
                epoch=meta["epoch"],
                model=model,
                optimizer=optimizer,
                extra=meta,
            )

    def load(self, *, job: TrainJob, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        return load_latest_checkpoint(root=job.checkpoint_uri, model=model, optimizer=optimizer)

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


@dataclass
class Position:
    """Where a rank is: the epoch to run next, steps of it already done, and what came before."""

    epoch: int = 1
    skip: int = 0
    step: int = 0
    samples: int = 0
    history: list[EpochMetrics] = field(default_factory=list)


def train_rank(
    *,
    job: TrainJob,
    rank: int,
    world_size: int,
    emit: Emit | None = None,
    parallel: Parallelism | None = None,
) -> RankResult:
    """Train on this rank's shards; rank 0 validates, emits metrics and saves the final weights."""
    parallel = parallel or Replicated()
    torch.set_num_threads(job.num_threads)
    torch.manual_seed(job.train.seed)  # same init everywhere; DDP also broadcasts rank 0's weights
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    manifest = load_manifest(job.manifest_uri)
    data = open_rank_data(manifest=manifest, rank=rank, world_size=world_size, device=device, train=job.train)
    model = build_model(
        spec=job.model, in_features=len(manifest.features), n_classes=len(manifest.classes)
    ).to(device)
    net = parallel.wrap(model, job=job, world_size=world_size)
    optimizer = make_optimizer(model, job.train)  # after wrap: FSDP replaces parameters in place
    n_steps = steps_per_epoch(manifest, world_size=world_size, batch_size=job.train.batch_size)
    scheduler, lr_at = make_scheduler(optimizer, job.train, total_steps=n_steps * job.train.epochs)
    pos = _resume(job=job, parallel=parallel, model=model, optimizer=optimizer, n_steps=n_steps)
    if pos.step:
        seek_schedule(scheduler, optimizer, lr_at, step=pos.step)
        if rank == 0 and emit:
            emit({"kind": "resume", "step": pos.step, "epoch": pos.epoch, "skip": pos.skip})
    # Under FSDP every forward all-gathers, so every rank must take part in validation.
    validates = rank == 0 or getattr(parallel, "collective_forward", False)
    val = ValSet(info=manifest.val, device=device) if validates else None
    ctx = _EpochContext(job=job, rank=rank, world_size=world_size, n_steps=n_steps, emit=emit)

    t_start = time.perf_counter()
    for epoch in range(pos.epoch, job.train.epochs + 1):
        skip = pos.skip if epoch == pos.epoch else 0
        t0 = time.perf_counter()
        totals, pos.step = _train_epoch(
            ctx,
            net=net,
            optimizer=optimizer,
            scheduler=scheduler,
            data=data,
            epoch=epoch,
            skip=skip,
            step=pos.step,
            checkpoint=lambda step, epoch, done: parallel.save(
                job=job, rank=rank, model=model, optimizer=optimizer, meta=_meta(step, epoch, done, pos, ctx)
            ),
        )
        if world_size > 1:
            dist.all_reduce(totals)
        pos.samples += int(totals[2])
        if validates:
            m = _epoch_metrics(model, val, totals, epoch=epoch, step=pos.step, optimizer=optimizer, t0=t0)
        if rank == 0:
            pos.history.append(m)
            if emit:
                emit({"kind": "epoch", "epochs": job.train.epochs, **m.model_dump()})
        parallel.save(
            job=job,
            rank=rank,
            model=model,
            optimizer=optimizer,
            meta=_meta(pos.step, epoch, n_steps, pos, ctx),
        )
    return _finish(
        job=job, rank=rank, model=model, parallel=parallel, pos=pos, seconds=time.perf_counter() - t_start
    )


@dataclass
class _EpochContext:
    job: TrainJob
    rank: int
    world_size: int
    n_steps: int
    emit: Emit | None
    last_report: float = field(default_factory=time.monotonic)


def _meta(step: int, epoch: int, done: int, pos: Position, ctx: _EpochContext) -> dict[str, Any]:
    """What a checkpoint needs for resuming: position in the epoch and the history so far."""
    return {
        "step": step,
        "epoch": epoch,
        **progress_meta(
            step_in_epoch=done,
            steps_per_epoch=ctx.n_steps,
            world_size=ctx.world_size,
            samples=pos.samples,
            history=pos.history,
        ),
    }


def _resume(
    *, job: TrainJob, parallel: Parallelism, model: nn.Module, optimizer: torch.optim.Optimizer, n_steps: int
) -> Position:
    if not job.train.resume:
        return Position()
    meta = parallel.load(job=job, model=model, optimizer=optimizer)
    if meta is None:
        return Position()
    epoch, skip = resume_point(meta, steps_per_epoch=n_steps)
    history = [EpochMetrics(**m) for m in meta.get("history", [])]
    return Position(
        epoch=epoch, skip=skip, step=(epoch - 1) * n_steps + skip, samples=meta["samples"], history=history
    )


def _finish(
    *, job: TrainJob, rank: int, model: nn.Module, parallel: Parallelism, pos: Position, seconds: float
) -> RankResult:
    state = parallel.full_state(model)  # collective: every rank takes part
    result = RankResult(
        rank=rank,
        params_sha256=state_sha256(state),
        history=pos.history if rank == 0 else [],
        steps=pos.step,
        samples=pos.samples,
        train_seconds=seconds,
    )
    if rank == 0:
        storage.write_bytes_atomic(job.output_uri, state_bytes(state))
        result.weights_uri = job.output_uri
    return result


def _train_epoch(
    ctx: _EpochContext,
    *,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: RankData,
    epoch: int,
    skip: int,
    step: int,
    checkpoint: Callable[[int, int, int], None],
) -> tuple[torch.Tensor, int]:
    """Steps ``skip..n_steps`` of one pass over this rank's rows; returns (sum of loss*n, correct, n)
    and the new global step. Checkpoints every ``checkpoint_every`` steps (not at the epoch's last
    step: the caller writes the end-of-epoch checkpoint)."""
    job, every, device = ctx.job, ctx.job.train.checkpoint_every, data.device
    net.train()
    # Loss and correct counts accumulate on the device: no host sync per step (matters on GPUs).
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    batches = data.batches(epoch=epoch, skip=skip, n_steps=ctx.n_steps)
    for i, (x, y) in enumerate(batches, start=skip):
        seed_dropout(job.train.seed * 1_000_003 + step * 131 + ctx.rank, device=device)
        with _autocast(device, job.train.precision):
            loss, correct, count = forward_loss(net, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        loss_sum += loss.detach().double() * count
        correct_sum += correct
        seen += count
        if every and step % every == 0 and i + 1 < ctx.n_steps:
            checkpoint(step, epoch, i + 1)
        if ctx.rank == 0 and ctx.emit and time.monotonic() - ctx.last_report > PROGRESS_EVERY_S:
            ctx.emit({"kind": "progress", "step": step, "epoch": epoch})
            ctx.last_report = time.monotonic()
    return torch.stack(
        [loss_sum, correct_sum, torch.tensor(float(seen), device=device, dtype=torch.float64)]
    ), step


def seed_dropout(seed: int, *, device: torch.device) -> None:
    """Seed the generator dropout draws from on ``device``, once per step, so a resumed run draws
    the same masks as an uninterrupted one. Only that device's generator: ``torch.manual_seed``
    also seeds every accelerator backend and costs ~180 us a call (7% of a small CPU step)."""
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device only
    else:
        torch.default_generator.manual_seed(seed)


def forward_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Loss, number of correct predictions and number of predictions for one batch.

    A causal language model (``causal_lm`` on the module, e.g. the zoo's gpt) predicts every
    position of its window: its targets are the inputs shifted by one with the row's label (the
    token after the window) appended, and every token is a prediction. It computes the loss in
    its own forward, where torch.compile can fuse it with the output layer.
    """
    if getattr(getattr(net, "module", net), "causal_lm", False):  # DDP keeps the model in .module
        targets = torch.cat([x[:, 1:], y[:, None].to(x.dtype)], dim=1).long()
        logits, loss = net(x, targets)  # logits: (batch, vocab, seq)
        return loss, (logits.argmax(1) == targets).sum(), targets.numel()
    logits = net(x)
    loss = F.cross_entropy(logits.float(), y)
    return loss, (logits.argmax(-1) == y).sum(), len(y)


def _epoch_metrics(
    model: nn.Module,
    val: ValSet,
    totals: torch.Tensor,
    *,
    epoch: int,
    step: int,
    optimizer: torch.optim.Optimizer,
    t0: float,
) -> EpochMetrics:
    per_s = float(totals[2]) / (time.perf_counter() - t0)  # before validating: training time only
    lm = getattr(model, "causal_lm", False)
    # LM logits are (rows, vocab, seq) floats: a token budget per validation batch bounds their memory.
    val_loss, val_acc = val_loss_accuracy(model, val.chunks(), tokens=2**14 if lm else None)
    n = max(float(totals[2]), 1.0)
    devices = dist.get_world_size() if dist.is_initialized() else 1
    return EpochMetrics(
        epoch=epoch,
        step=step,
        train_loss=float(totals[0]) / n,
        train_accuracy=float(totals[1]) / n,
        val_loss=val_loss,
        val_accuracy=val_acc,
        samples_per_s=per_s,
        lr=optimizer.param_groups[0]["lr"],
        tokens_per_s=per_s if lm else None,
        mfu=mfu(flops_per_token=model.flops_per_token(), tokens_per_s=per_s, devices=devices) if lm else None,
    )


@torch.no_grad()
def val_loss_accuracy(
    model: nn.Module, chunks: Iterable[Batch], *, batch: int = 4096, tokens: int | None = None
) -> tuple[float, float]:
    """Mean loss and accuracy over the rows of all ``chunks`` (e.g. a shard's parts, one in memory
    at a time; sums run over all of them), each cut into batches of ``batch`` rows, or with
    ``tokens`` of ``max(1, tokens // row width)`` rows."""
    model.eval()
    loss_sum, correct, count = 0.0, 0.0, 0
    for x, y in chunks:
        rows = batch if tokens is None else max(1, tokens // x.shape[1])
        for i in range(0, len(x), rows):
            loss, c, n = forward_loss(model, x[i : i + rows], y[i : i + rows])
            loss_sum, correct, count = loss_sum + loss.item() * n, correct + float(c), count + n
    model.train()
    return loss_sum / max(count, 1), correct / max(count, 1)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def params_sha256(model: nn.Module) -> str:
    """sha256 over the state dict in key order: equal on every rank after DDP; the run's fingerprint."""
    return state_sha256(model.state_dict())


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's tensors in key order."""
    h = hashlib.sha256()
    for _, p in sorted(state.items()):
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
