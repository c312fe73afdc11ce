"""Federated averaging (FedAvg, McMahan et al. 2017) with simulated clients on a Dask cluster.

K clients each own a partition of the training rows (IID, Dirichlet label skew, or the paper's
label-sorted shards). Each round a seeded sample of max(1, round(C*K)) clients runs E local
epochs of plain SGD with batch B from the current global weights, as Dask tasks beside their
rows; the server (the caller) averages the updates weighted by local row counts. FedSGD is the
case E=1, B=0: one full-batch gradient step per client per round.

The clients' rows are built on the cluster part by part (fedavg_data.py): neither the server nor
any worker reads the whole training set. Surviving a lost worker: the clients' rows, the
validation parts and each round's weights live on the cluster as results of tasks, never as
scattered data, so when a worker dies Dask recomputes what it held and reruns its client updates
elsewhere; the round's result is the same, bit for bit, because a client's update depends only on
the seed, the round and the client.

Options, applied client-side: clip each update to an L2 norm and add Gaussian noise
(differential privacy), and secure-aggregation-style pairwise masks (Bonawitz et al. 2017):
each pair of sampled clients derives a shared mask that one adds and the other subtracts, on
fixed-point integers modulo 2**64, so the masks cancel exactly in the sum while each masked
update alone is uniformly random. The aggregation math is in federated_math.py (pure numpy).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from distributed import Client
from torch import nn

from mms_core import storage
from mms_core.data.shard import load_manifest
from mms_core.errors import TrainingError
from mms_core.models import build_model
from mms_core.training.checkpoint import load_latest_checkpoint, save_checkpoint, state_bytes
from mms_core.training.fedavg_client import (
    LocalResult,
    RoundContext,
    evaluate_weights,
    get_weights,
    local_update,
    set_weights,
)
from mms_core.training.fedavg_data import ClientData, place_clients
from mms_core.training.federated_math import sample_clients, unmask_average, weighted_average
from mms_core.training.launch import worker_addresses
from mms_core.training.loop import params_sha256
from mms_core.training.spec import EpochMetrics, FedAvgSpec, RankResult, TrainJob


@dataclass(frozen=True)
class FederatedRun:
    weights: np.ndarray
    history: list[EpochMetrics]
    steps: int
    samples: int


RunClients = Callable[[np.ndarray, RoundContext], list[LocalResult]]
Evaluate = Callable[[np.ndarray], tuple[float, float]]


def aggregate(results: Sequence[LocalResult]) -> np.ndarray:
    """The round's global update from its clients' results (masked or plain)."""
    rows = [r.rows for r in results]
    if all(r.masked for r in results):
        return unmask_average(masked=[r.update for r in results], total_weight=float(sum(rows)))
    if any(r.masked for r in results):
        raise TrainingError("a round mixed masked and plain updates; they cannot be summed together")
    return weighted_average(updates=[r.update for r in results], weights=rows)


def federated_training(
    *,
    spec: FedAvgSpec,
    init: np.ndarray,
    seed: int,
    run_clients: RunClients,
    evaluate: Evaluate,
    emit: Callable[[dict], None] | None = None,
    stop: Callable[[EpochMetrics], bool] | None = None,
    resumed: FederatedRun | None = None,
    on_round: Callable[[FederatedRun], None] | None = None,
) -> FederatedRun:
    """The server's loop: sample, run the clients, average, evaluate; one EpochMetrics per round.

    ``run_clients`` and ``evaluate`` decide where the work runs (Dask tasks in :func:`run_fedavg`,
    plain calls in bench/fedavg_table.py). ``step`` in the metrics counts local SGD steps summed
    over all clients so far. ``stop(metrics)`` returning True ends the run after that round.
    ``resumed`` (a checkpointed state) continues after its last round: every round is seeded by
    (seed, round), so the result equals an uninterrupted run's; ``on_round`` sees each round's state.
    """
    weights, history, steps, samples = init.astype(np.float32), [], 0, 0
    if resumed is not None:
        weights, history = resumed.weights.astype(np.float32), list(resumed.history)
        steps, samples = resumed.steps, resumed.samples
    for r in range(len(history) + 1, spec.rounds + 1):
        t0 = time.perf_counter()
        ctx = RoundContext(
            round_index=r, participants=sample_clients(spec=spec, round_index=r, seed=seed), seed=seed
        )
        results = run_clients(weights, ctx)
        weights = (weights.astype(np.float64) + aggregate(results)).astype(np.float32)
        elapsed = time.perf_counter() - t0
        round_samples = sum(res.samples for res in results)
        steps += sum(res.steps for res in results)
        samples += round_samples
        val_loss, val_acc = evaluate(weights)
        m = EpochMetrics(
            epoch=r,
            step=steps,
            train_loss=sum(res.loss_sum for res in results) / round_samples,
            train_accuracy=sum(res.correct for res in results) / round_samples,
            val_loss=val_loss,
            val_accuracy=val_acc,
            samples_per_s=round_samples / elapsed,
            lr=spec.client_lr,
        )
        history.append(m)
        if on_round:
            on_round(FederatedRun(weights=weights, history=history, steps=steps, samples=samples))
        if emit:
            emit({"kind": "epoch", "epochs": spec.rounds, "clients": len(results), **m.model_dump()})
        if stop and stop(m):
            break
    return FederatedRun(weights=weights, history=history, steps=steps, samples=samples)


def run_fedavg(
    *, client: Client, job: TrainJob, on_event: Callable[[dict], None] | None = None
) -> list[RankResult]:
    """Train ``job`` with federated averaging (``job.train.fedavg``) on the cluster's workers.

    Args:
        client: a connected Dask client (built by the caller).
        job: the training job; ``job.train.seed`` seeds init, partition, sampling, shuffles,
            noise and masks, so a run is reproducible on any number of workers.
        on_event: called in this thread after each round with its metrics (``epoch`` = round).

    Returns:
        One RankResult (rank 0, the server): per-round history, final weights at
        ``job.output_uri`` (safetensors), local steps and rows summed over clients.
    """
    if not worker_addresses(client):
        raise TrainingError(
            "the Dask cluster has no workers; start some (mms stack up, MMS_N_WORKERS) and retry"
        )
    spec, seed = job.train.fedavg, job.train.seed
    manifest = load_manifest(job.manifest_uri)
    build = partial(
        build_model, spec=job.model, in_features=len(manifest.features), n_classes=len(manifest.classes)
    )
    model = _seeded_model(build, seed=seed)
    t0 = time.perf_counter()
    data = place_clients(client, manifest=manifest, spec=spec, seed=seed, workers=worker_addresses(client))
    run_clients, evaluate = _on_dask(client, build=build, data=data, spec=spec, threads=job.num_threads)
    store = _RoundCheckpoints(job=job, model=model)
    resumed = store.load() if job.train.resume else None
    if resumed is not None and on_event:
        on_event({"kind": "resume", "step": resumed.steps, "epoch": len(resumed.history), "skip": 0})
    try:
        run = federated_training(
            spec=spec,
            init=get_weights(model),
            seed=seed,
            run_clients=run_clients,
            evaluate=evaluate,
            emit=on_event,
            resumed=resumed,
            on_round=store.save,
        )
    finally:
        client.cancel(data.futures())
    set_weights(model, run.weights)
    storage.write_bytes_atomic(job.output_uri, state_bytes(model))
    return [
        RankResult(
            rank=0,
            params_sha256=params_sha256(model),
            history=run.history,
            weights_uri=job.output_uri,
            steps=run.steps,
            samples=run.samples,
            train_seconds=time.perf_counter() - t0,
        )
    ]


@dataclass
class _RoundCheckpoints:
    """The server's state after each round (global weights, history, counters) as a checkpoint
    (checkpoint.py: safetensors, checksums, fallback past a corrupt one), so a re-run resumes."""

    job: TrainJob
    model: nn.Module

    def save(self, run: FederatedRun) -> None:
        set_weights(self.model, run.weights)
        save_checkpoint(
            root=self.job.checkpoint_uri,
            step=len(run.history),  # the round: fedavg checkpoints are numbered by round
            epoch=len(run.history),
            model=self.model,
            optimizer=self._stateless_optimizer(),
            extra={
                "history": [m.model_dump() for m in run.history],
                "steps": run.steps,
                "samples": run.samples,
            },
        )

    def load(self) -> FederatedRun | None:
        meta = load_latest_checkpoint(root=self.job.checkpoint_uri, model=self.model)
        if meta is None:
            return None
        return FederatedRun(
            weights=get_weights(self.model),
            history=[EpochMetrics(**m) for m in meta["history"]],
            steps=meta["steps"],
            samples=meta["samples"],
        )

    def _stateless_optimizer(self) -> torch.optim.Optimizer:
        # The server only averages; the checkpoint format still carries an (empty) optimizer state.
        return torch.optim.SGD(self.model.parameters(), lr=self.job.train.fedavg.client_lr)


def _on_dask(
    client: Client, *, build: Callable[[], nn.Module], data: ClientData, spec: FedAvgSpec, threads: int
) -> tuple[RunClients, Evaluate]:
    """The round loop's two callbacks as Dask tasks on the clients' data futures."""

    def each_with_model(fn: Callable, weights: np.ndarray, calls: list[dict], *, what: str) -> list:
        # The weights go once per round, not once per task; a task (not scatter) so that Dask
        # can recompute them if their worker dies.
        w = client.submit(_value, weights, pure=False)
        futures = [
            client.submit(_with_model, fn, build=build, num_threads=threads, pure=False, weights=w, **kw)
            for kw in calls
        ]
        return _gather(client, futures, what=what)

    def run_clients(weights: np.ndarray, ctx: RoundContext) -> list[LocalResult]:
        calls = [
            {"data": data.clients[k], "spec": spec, "client_id": k, "ctx": ctx} for k in ctx.participants
        ]
        return each_with_model(local_update, weights, calls, what=f"round {ctx.round_index}: a client update")

    def evaluate(weights: np.ndarray) -> tuple[float, float]:
        results = each_with_model(
            evaluate_weights, weights, [{"data": part} for part in data.val], what="evaluation"
        )
        return _mean_over_parts(results, rows=data.val_rows)

    return run_clients, evaluate


def _mean_over_parts(results: list[tuple[float, float]], *, rows: list[int]) -> tuple[float, float]:
    """(loss, accuracy) over all validation rows from each part's means, weighted by its rows.
    One part (a single-file shard) is returned as computed, bit for bit."""
    if len(results) == 1:
        return results[0]
    total = sum(rows)
    loss = sum(r[0] * n for r, n in zip(results, rows, strict=True)) / total
    correct = sum(round(r[1] * n) for r, n in zip(results, rows, strict=True))
    return loss, correct / total


def _value(v: Any) -> Any:
    return v


def _seeded_model(build: Callable[[], nn.Module], *, seed: int) -> nn.Module:
    # Same init as the DDP loop (manual_seed, then build), without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _with_model(fn: Callable, *, build: Callable[[], nn.Module], num_threads: int, **kwargs):
    """Runs on a worker: a fresh model per task, so tasks sharing a worker never share weights."""
    torch.set_num_threads(num_threads)
    return fn(model=build(), **kwargs)


def _gather(client: Client, futures: list, *, what: str) -> list:
    try:
        return client.gather(futures)
    except Exception as exc:  # a task's own error type, or distributed's for a lost worker
        raise TrainingError(f"fedavg {what} failed: {exc!r}") from exc
    finally:
        client.cancel(futures)
