"""Asynchronous SGD against a parameter server held in Dask actors (strategy ``param_server``).

The model's parameters are split by tensor across ``training.param_server.shards`` actors
(:class:`ParamShard`, balanced by size), placed round-robin on the chosen workers. One worker
task per rank (``training.world_size``, default all workers) reads its own training shards and
loops: compute a gradient on one batch at the parameters it pulled, push each shard its slice
and get that shard's parameters for the next step in the reply (one round trip per shard and
step), without waiting for the other workers. The optimizer (the spec's SGD or AdamW, lr and
schedule) runs on the shards. How versions, clocks and the staleness bound fit together is in
param_server_actor.py; in short ``None`` is fully asynchronous, ``S`` lets a worker run at most
S steps ahead of the slowest, and 0 is exactly synchronous SGD on the ranks' mean gradient.

The caller's thread (the driver) collects a snapshot of the server at each epoch end and every
``checkpoint_every`` steps: it evaluates on the validation shard, emits the ``epoch`` event and
a ``staleness`` event (``{"kind": "staleness", "epoch", "step", "histogram": {staleness: count}}``)
and writes a checkpoint (model + merged optimizer state, resumable). Training never waits for it.
A failed worker task fails the run at once, with the shards closed so that no other task waits
for ever. A lost worker (killed, out of memory, node gone) takes its shard's state with it, so
the driver fails over with the process-group launcher's code (launch.py: the same watch, the same
``fail_over``): it closes the surviving shards, which ends the other worker tasks, and starts the
run again from the last checkpoint on the workers there are then, up to
``training.max_restarts`` times, with a ``restart`` event naming the steps that will be repeated.
No worker is restarted.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from distributed import Client
from torch import nn

from mms_core import storage
from mms_core.data.shard import load_manifest
from mms_core.data.stream import ValSet
from mms_core.errors import TrainingError
from mms_core.models import build_model
from mms_core.training.checkpoint import (
    load_latest_checkpoint,
    progress_meta,
    resume_point,
    save_checkpoint,
    state_bytes,
)
from mms_core.training.launch import POLL_S, Watch, WorkerLost, choose_workers, fail_over
from mms_core.training.loop import params_sha256, steps_per_epoch, val_loss_accuracy
from mms_core.training.optim import make_optimizer
from mms_core.training.param_server_actor import ParamShard, ServerPlan
from mms_core.training.param_server_worker import ParamLayout, plan_shards, run_worker
from mms_core.training.spec import EpochMetrics, RankResult, TrainJob

OnEvent = Callable[[dict[str, Any]], None]


@dataclass
class _Progress:
    """What the driver has gathered so far (restored from a checkpoint when resuming)."""

    clock: int = 0
    samples: int = 0
    history: list[EpochMetrics] = field(default_factory=list)
    staleness: Counter = field(default_factory=Counter)


@dataclass
class _Run:
    """One run's fixed parts, as the driver sees them."""

    client: Client
    job: TrainJob
    workers: list[str]
    model: nn.Module  # holds the server's parameters as of the last snapshot
    optimizer: torch.optim.Optimizer  # the shards' optimizer states, merged, for checkpoints
    layout: ParamLayout
    plan: ServerPlan
    on_event: OnEvent | None

    def emit(self, event: dict[str, Any]) -> None:
        if self.on_event:
            self.on_event(event)


def run_param_server(*, client: Client, job: TrainJob, on_event: OnEvent | None = None) -> list[RankResult]:
    """Train ``job`` with asynchronous SGD against parameter-server actors on the cluster.

    Args:
        client: a connected Dask client (built by the caller).
        job: the training job; ``job.train.param_server`` sets the shards and staleness bound,
            ``job.train.world_size`` the worker tasks (default: one per Dask worker).
        on_event: called in this thread with ``epoch`` events (as DDP), ``staleness`` events
            and a ``resume`` event when a checkpoint is picked up.

    Returns:
        One RankResult per worker task, rank 0 first. All carry the final parameters' hash and
        ``stats``: ``staleness_histogram`` of the whole run ({staleness: gradients}, string
        keys), ``rank_staleness_histogram`` (that rank's gradients), ``server_versions`` and
        ``shards``; rank 0 also the history and the weights' URI.
    """
    run = _setup(client, job, on_event)
    progress = _resume(run)
    for attempt in range(1, job.train.max_restarts + 2):
        try:
            summaries = _train(run, progress) if progress.clock < run.plan.total_clocks else []
            break
        except WorkerLost as exc:
            fail_over(client, exc, job=job, attempt=attempt, last_step=exc.step, emit=run.emit)
            # on the workers there are now (maybe fewer): the plan's step counts follow the world size
            run = _setup(client, job, on_event, allow_fewer=True)
            progress = _resume(run)
    storage.write_bytes_atomic(job.output_uri, state_bytes(run.model))
    sha, total = params_sha256(run.model), _jsonable(progress.staleness)
    return [
        RankResult(
            rank=r,
            params_sha256=sha,
            history=progress.history if r == 0 else [],
            weights_uri=job.output_uri if r == 0 else None,
            steps=run.plan.total_clocks,
            samples=progress.samples,
            train_seconds=s.get("seconds", 0.0),
            stats={
                "staleness_histogram": total,
                "rank_staleness_histogram": s.get("staleness", {}),
                "server_versions": run.plan.total_clocks * run.plan.versions_per_clock,
                "shards": len(run.layout.shards),
            },
        )
        for r, s in enumerate(summaries or [{} for _ in run.workers])
    ]


def _setup(client: Client, job: TrainJob, on_event: OnEvent | None, *, allow_fewer: bool = False) -> _Run:
    workers = choose_workers(client, job=job, allow_fewer=allow_fewer)
    world_size = len(workers)
    manifest = load_manifest(job.manifest_uri)
    # Same init as the DDP loop (manual_seed, then build), without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.train.seed)
        model = build_model(
            spec=job.model, in_features=len(manifest.features), n_classes=len(manifest.classes)
        )
    spe = steps_per_epoch(manifest, world_size=world_size, batch_size=job.train.batch_size)
    return _Run(
        client=client,
        job=job,
        workers=workers,
        model=model,
        optimizer=make_optimizer(model, job.train),
        layout=plan_shards(model=model, shards=job.train.param_server.shards),
        plan=ServerPlan(
            world_size=world_size,
            staleness_bound=job.train.param_server.staleness_bound,
            steps_per_epoch=spe,
            epochs=job.train.epochs,
            checkpoint_every=job.train.checkpoint_every,
        ),
        on_event=on_event,
    )


def _train(run: _Run, progress: _Progress) -> list[dict[str, Any]]:
    """Start the shards and the worker tasks, follow them to the end; returns the workers' summaries."""
    actors, actor_futures = _start_shards(run, start=progress.clock)
    tasks = [
        run.client.submit(
            run_worker,
            run.job,
            rank=r,
            plan=run.plan,
            layout=run.layout,
            shards=actors,
            start_clock=progress.clock,
            workers=[w],
            allow_other_workers=False,
            pure=False,
        )
        for r, w in enumerate(run.workers)
    ]
    watch = Watch(
        run.client,
        workers=run.workers,
        tasks=tasks,
        what="param_server worker",
        calls="param_server: a parameter-server shard",
        poll_s=POLL_S,
    )
    try:
        follower = _Follower(run, shards=actors, watch=watch)
        for clock in run.plan.marks(after=progress.clock):
            follower.mark(clock, progress)
        return watch.wait(tasks)
    except WorkerLost as exc:
        exc.step = progress.clock  # the last checkpointed clock: what the restart resumes from
        raise
    finally:
        _close(actors)
        run.client.cancel([*tasks, *actor_futures])


def _close(actors: list[Any], *, timeout: float = 10.0) -> None:
    """Close every shard (releasing any task waiting on one), all at once and within ``timeout``:
    a shard whose worker is gone never answers, and the run's own error is the one to report."""
    calls = []
    for a in actors:
        with contextlib.suppress(Exception):
            calls.append(a.close())
    deadline = time.monotonic() + timeout
    for c in calls:
        with contextlib.suppress(Exception):
            c.result(timeout=max(0.1, deadline - time.monotonic()))


def _start_shards(run: _Run, *, start: int) -> tuple[list[Any], list[Any]]:
    """One ParamShard actor per shard, round-robin over the workers; their initial state is
    scattered straight to the worker that will hold it (not through the scheduler)."""
    params = run.layout.split(run.model)
    optim = run.optimizer.state_dict()
    states = run.layout.split_optimizer_state(optim) if start else [None] * len(params)
    futures = []
    for s, (flat, state) in enumerate(zip(params, states, strict=True)):
        where = run.workers[s % len(run.workers)]
        [flat_f, state_f] = run.client.scatter([flat, state], workers=[where], hash=False)
        futures.append(
            run.client.submit(
                ParamShard,
                params=flat_f,
                shapes=[run.layout.shapes[i] for i in run.layout.shards[s]],
                train=run.job.train,
                plan=run.plan,
                start_clock=start,
                optim_state=state_f,
                actor=True,
                workers=[where],
                allow_other_workers=False,
                pure=False,
            )
        )
    try:
        return [f.result() for f in futures], futures
    except Exception as exc:
        raise TrainingError(f"starting the parameter-server actors failed: {exc!r}") from exc


class _Follower:
    """The driver's side of a run: at each mark, take the shards' snapshot, then evaluate and
    emit (at epoch ends) and checkpoint."""

    def __init__(self, run: _Run, *, shards: list[Any], watch: Watch) -> None:
        self.run, self.shards, self.watch = run, shards, watch
        manifest = load_manifest(run.job.manifest_uri)
        self.val = ValSet(info=manifest.val, device=torch.device("cpu"))  # streamed when it has parts
        self.t_epoch = time.perf_counter()

    def mark(self, clock: int, progress: _Progress) -> None:
        run = self.run
        snaps = self.watch.wait(
            [s.snapshot(version=clock * run.plan.versions_per_clock) for s in self.shards]
        )
        run.layout.load(run.model, [s.params for s in snaps])
        run.optimizer.load_state_dict(run.layout.merge_optimizer_states([s.optimizer for s in snaps]))
        epoch, done = divmod(clock, run.plan.steps_per_epoch)
        if done == 0:
            self._end_epoch(epoch, clock, progress)
        progress.clock = clock
        save_checkpoint(
            root=run.job.checkpoint_uri,
            step=clock,
            epoch=epoch if done == 0 else epoch + 1,  # the epoch finished, or the one under way
            model=run.model,
            optimizer=run.optimizer,
            extra=_meta(clock, run.plan, progress),
        )

    def _end_epoch(self, epoch: int, clock: int, progress: _Progress) -> None:
        """Epoch metrics from the server's parameters and the ranks' reports of that epoch."""
        reports = self.watch.wait([self.shards[0].reports(epoch=epoch)])[0].values()
        rows = sum(r["count"] for r in reports)
        hist = sum((Counter({int(k): v for k, v in r["staleness"].items()}) for r in reports), Counter())
        val_loss, val_acc = val_loss_accuracy(self.run.model, self.val.chunks())
        now = time.perf_counter()
        m = EpochMetrics(
            epoch=epoch,
            step=clock,
            train_loss=sum(r["loss_sum"] for r in reports) / max(rows, 1),
            train_accuracy=sum(r["correct"] for r in reports) / max(rows, 1),
            val_loss=val_loss,
            val_accuracy=val_acc,
            samples_per_s=rows / max(now - self.t_epoch, 1e-9),
            lr=self.run.optimizer.param_groups[0]["lr"],  # the next step's, as the DDP loop reports
        )
        self.t_epoch = now
        progress.history.append(m)
        progress.samples += rows
        progress.staleness.update(hist)
        self.run.emit({"kind": "epoch", "epochs": self.run.plan.epochs, **m.model_dump()})
        self.run.emit({"kind": "staleness", "epoch": epoch, "step": clock, "histogram": _jsonable(hist)})


def _meta(clock: int, plan: ServerPlan, progress: _Progress) -> dict[str, Any]:
    """What resuming needs: the DDP loop's resume data, plus the staleness so far and the version."""
    return {
        **progress_meta(
            step_in_epoch=clock % plan.steps_per_epoch or plan.steps_per_epoch,
            steps_per_epoch=plan.steps_per_epoch,
            world_size=plan.world_size,
            samples=progress.samples,
            history=progress.history,
        ),
        "staleness_histogram": _jsonable(progress.staleness),
        "version": clock * plan.versions_per_clock,
    }


def _resume(run: _Run) -> _Progress:
    """Restore model and optimizer from the newest valid checkpoint; where to start from."""
    if not run.job.train.resume:
        return _Progress()
    meta = load_latest_checkpoint(root=run.job.checkpoint_uri, model=run.model, optimizer=run.optimizer)
    if meta is None:
        return _Progress()
    epoch, skip = resume_point(meta, steps_per_epoch=run.plan.steps_per_epoch)
    clock = min((epoch - 1) * run.plan.steps_per_epoch + skip, run.plan.total_clocks)
    run.emit({"kind": "resume", "step": clock, "epoch": epoch, "skip": skip})
    return _Progress(
        clock=clock,
        samples=meta.get("samples", 0),
        history=[EpochMetrics(**m) for m in meta.get("history", [])],
        staleness=Counter({int(k): v for k, v in meta.get("staleness_histogram", {}).items()}),
    )


def _jsonable(hist: Counter) -> dict[str, int]:
    """A histogram {staleness: count} with string keys in numeric order (JSON, MLflow params)."""
    return {str(k): int(hist[k]) for k in sorted(hist)}
