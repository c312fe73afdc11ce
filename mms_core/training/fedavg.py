"""Federated averaging (FedAvg, McMahan et al. 2017) with simulated clients on a Dask cluster.

K clients each own a partition of the training rows (IID, Dirichlet label skew, or the paper's
label-sorted shards). Each round a seeded sample of max(1, round(C*K)) clients runs E local
epochs of plain SGD with batch B from the current global weights, as Dask tasks beside their
rows (scattered once); the server (the caller) averages the updates weighted by local row
counts. FedSGD is the case E=1, B=0: one full-batch gradient step per client per round.

Options, applied client-side: clip each update to an L2 norm and add Gaussian noise
(differential privacy), and secure-aggregation-style pairwise masks (Bonawitz et al. 2017):
each pair of sampled clients derives a shared mask that one adds and the other subtracts, on
fixed-point integers modulo 2**64, so the masks cancel exactly in the sum while each masked
update alone is uniformly random. The aggregation math is pure numpy, testable without Dask.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from distributed import Client
from torch import nn

from mms_core import storage
from mms_core.data.shard import Manifest, load_manifest, read_shard
from mms_core.errors import DataError, TrainingError
from mms_core.models import build_model
from mms_core.training.checkpoint import state_bytes
from mms_core.training.loop import params_sha256
from mms_core.training.spec import EpochMetrics, FedAvgSpec, RankResult, TrainJob

FRAC_BITS = 32  # fixed-point resolution 2**-32 for masked updates; their sum must stay below 2**30
# Separate random streams per purpose, so e.g. turning DP noise on does not change client sampling.
_PARTITION, _SAMPLE, _SHUFFLE, _NOISE, _MASK = range(5)


@dataclass(frozen=True)
class RoundContext:
    """What a sampled client learns about its round."""

    round_index: int
    participants: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class LocalResult:
    """One client's contribution to a round."""

    client_id: int
    update: np.ndarray  # float64 weights delta, or uint64 masked fixed-point of rows * delta
    rows: int  # n_k, the aggregation weight
    masked: bool
    loss_sum: float
    correct: int
    samples: int
    steps: int


@dataclass(frozen=True)
class FederatedRun:
    weights: np.ndarray
    history: list[EpochMetrics]
    steps: int
    samples: int


RunClients = Callable[[np.ndarray, RoundContext], list[LocalResult]]
Evaluate = Callable[[np.ndarray], tuple[float, float]]


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng([e % 2**63 for e in entropy])  # SeedSequence needs entropy >= 0


def partition(
    labels: np.ndarray,
    *,
    clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split row indices among ``clients``: every row goes to exactly one client, none is empty.

    Args:
        labels: class index of each training row.
        clients: number of clients K.
        scheme: ``iid`` (uniform random, sizes differ by at most one), ``dirichlet`` (per class,
            shares drawn from Dir(alpha); small alpha gives few labels per client) or ``shards``
            (rows sorted by label, cut into K * shards_per_client equal shards, dealt at random).
        alpha: Dirichlet concentration.
        shards_per_client: label-sorted shards per client for ``shards`` (the paper used 2).
        seed: seed of the split.

    Returns:
        One sorted index array per client.
    """
    labels = np.asarray(labels)
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    if len(labels) < clients:
        raise DataError(
            f"{len(labels)} training rows cannot give each of {clients} clients a row; "
            "lower training.fedavg.clients"
        )
    rng = _rng(seed, _PARTITION)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(labels)), clients)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, clients=clients, alpha=alpha, rng=rng)
    elif scheme == "shards":
        parts = _label_shards(labels, clients=clients, per_client=shards_per_client, rng=rng)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}: use 'iid', 'dirichlet' or 'shards'")
    return [np.sort(p) for p in parts]


def _dirichlet(labels: np.ndarray, *, clients: int, alpha: float, rng: np.random.Generator) -> list:
    buckets: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            buckets[k].append(chunk)
    parts = [np.concatenate(b) for b in buckets]
    # Small alpha leaves some clients empty; each takes one row from the largest client. Since
    # rows >= clients, that client always has two or more, so no client ends up empty.
    for k in range(clients):
        if len(parts[k]) == 0:
            big = max(range(clients), key=lambda j: len(parts[j]))
            parts[k], parts[big] = parts[big][-1:], parts[big][:-1]
    return parts


def _label_shards(labels: np.ndarray, *, clients: int, per_client: int, rng: np.random.Generator) -> list:
    n_shards = clients * per_client
    if len(labels) < n_shards:
        raise DataError(
            f"{len(labels)} training rows cannot fill {n_shards} shards ({clients} clients x "
            f"{per_client}); lower training.fedavg.clients or shards_per_client"
        )
    order = rng.permutation(len(labels))  # random order within each label
    order = order[np.argsort(labels[order], kind="stable")]
    shards = np.array_split(order, n_shards)
    dealt = rng.permutation(n_shards).reshape(clients, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in dealt]


def sample_clients(*, spec: FedAvgSpec, round_index: int, seed: int) -> tuple[int, ...]:
    """The max(1, round(C*K)) clients of a round, sorted; seeded by (seed, round)."""
    rng = _rng(seed, _SAMPLE, round_index)
    return tuple(sorted(int(k) for k in rng.choice(spec.clients, spec.clients_per_round, replace=False)))


def weighted_average(*, updates: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_k w_k u_k / sum_k w_k in float64 (FedAvg's server step, weights = local row counts)."""
    w = np.asarray(weights, dtype=np.float64)
    if len(updates) == 0 or len(updates) != len(w):
        raise ValueError(f"need one weight per update, got {len(updates)} updates and {len(w)} weights")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {w.tolist()}")
    total = np.zeros(np.shape(updates[0]), dtype=np.float64)
    for u, wk in zip(updates, w, strict=True):
        total += wk * np.asarray(u, dtype=np.float64)
    return total / w.sum()


def clip_and_noise(
    *, update: np.ndarray, clip: float, noise_multiplier: float = 0.0, rng: np.random.Generator
) -> np.ndarray:
    """Scale ``update`` down to L2 norm <= ``clip``, then add N(0, (noise_multiplier * clip)^2) noise."""
    u = np.asarray(update, dtype=np.float64)
    norm = float(np.linalg.norm(u))
    if norm > clip:
        u = u * (clip / norm)
    if noise_multiplier > 0:
        u = u + rng.normal(0.0, noise_multiplier * clip, size=u.shape)
    return u


def pairwise_mask(
    *, client_id: int, participants: Sequence[int], size: int, round_index: int, seed: int
) -> np.ndarray:
    """This client's mask: + the shared mask of each pair where it is the lower id, - otherwise.

    Pair masks are seeded by (seed, round, pair), standing in for the key agreement of real
    secure aggregation; summed over all participants they cancel modulo 2**64.
    """
    mask = np.zeros(size, dtype=np.uint64)
    for other in participants:
        if other == client_id:
            continue
        lo, hi = sorted((client_id, other))
        shared = _rng(seed, _MASK, round_index, lo, hi).integers(
            0, np.iinfo(np.uint64).max, size=size, dtype=np.uint64, endpoint=True
        )
        if client_id == lo:
            mask += shared  # uint64 arrays wrap modulo 2**64, which is the point
        else:
            mask -= shared
    return mask


def pairwise_masks(
    *, participants: Sequence[int], size: int, round_index: int, seed: int
) -> dict[int, np.ndarray]:
    """Every participant's mask (see :func:`pairwise_mask`); they sum to zero modulo 2**64."""
    return {
        k: pairwise_mask(
            client_id=k, participants=participants, size=size, round_index=round_index, seed=seed
        )
        for k in participants
    }


def mask_update(*, update: np.ndarray, weight: float, mask: np.ndarray, participants: int) -> np.ndarray:
    """Client side: fixed-point ``weight * update`` plus ``mask``, as uint64 modulo 2**64."""
    scaled = weight * np.asarray(update, dtype=np.float64)
    limit = 2.0 ** (62 - FRAC_BITS) / max(1, participants)  # so the sum of all clients cannot wrap
    if not np.isfinite(scaled).all() or np.abs(scaled).max(initial=0.0) >= limit:
        raise TrainingError(
            f"a weighted update left the secure-aggregation fixed-point range (|x| < {limit:.3g}); "
            "the client diverged: lower training.fedavg.client_lr or set dp_clip"
        )
    return np.round(scaled * 2.0**FRAC_BITS).astype(np.int64).view(np.uint64) + mask


def unmask_average(*, masked: Sequence[np.ndarray], total_weight: float) -> np.ndarray:
    """Server side: the masks cancel in the modular sum; decode it and divide by the total weight."""
    total = np.zeros_like(masked[0])
    for m in masked:
        total += m
    return total.view(np.int64).astype(np.float64) / 2.0**FRAC_BITS / total_weight


def aggregate(results: Sequence[LocalResult]) -> np.ndarray:
    """The round's global update from its clients' results (masked or plain)."""
    rows = [r.rows for r in results]
    if all(r.masked for r in results):
        return unmask_average(masked=[r.update for r in results], total_weight=float(sum(rows)))
    if any(r.masked for r in results):
        raise TrainingError("a round mixed masked and plain updates; they cannot be summed together")
    return weighted_average(updates=[r.update for r in results], weights=rows)


def _float_tensors(model: nn.Module) -> list[torch.Tensor]:
    # state_dict tensors alias the model's storage; integer buffers (BatchNorm's step count)
    # are not averaged and keep their initial values.
    return [t for t in model.state_dict().values() if t.is_floating_point()]


def _tensor(a: np.ndarray) -> torch.Tensor:
    # Arrays from Dask (or Parquet) can be read-only, which torch.from_numpy warns about.
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def get_weights(model: nn.Module) -> np.ndarray:
    """The model's floating-point state as one float32 vector (state_dict order)."""
    return np.concatenate([t.detach().cpu().reshape(-1).float().numpy() for t in _float_tensors(model)])


def set_weights(model: nn.Module, weights: np.ndarray) -> None:
    """Load a vector made by :func:`get_weights` into ``model``."""
    offset = 0
    with torch.no_grad():
        for t in _float_tensors(model):
            chunk = _tensor(np.asarray(weights[offset : offset + t.numel()], dtype=np.float32))
            t.copy_(chunk.view_as(t))
            offset += t.numel()
    if offset != len(weights):
        raise ValueError(f"weights vector has {len(weights)} values, the model {offset}")


def local_update(
    *,
    model: nn.Module,
    weights: np.ndarray,
    data: tuple[np.ndarray, np.ndarray],
    spec: FedAvgSpec,
    client_id: int,
    ctx: RoundContext,
) -> LocalResult:
    """One client's round: E epochs of plain SGD from ``weights``, then DP and masking if configured.

    Args:
        model: a model of the job's architecture (its weights are overwritten).
        weights: the global weights (float32 vector).
        data: this client's (features, labels).
        spec: the fedavg settings.
        client_id: this client's index.
        ctx: the round (index, participants, seed).

    Returns:
        The update (weights delta; masked fixed-point when secure aggregation is on) and counts.
    """
    set_weights(model, weights)
    # Shuffles and dropout seeded by (seed, round, client): the same result on any worker.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(_rng(ctx.seed, _SHUFFLE, ctx.round_index, client_id).integers(2**62)))
        loss_sum, correct, steps = _local_sgd(model, data=data, spec=spec)
    delta = get_weights(model).astype(np.float64) - weights.astype(np.float64)
    if spec.dp_clip is not None:
        noise_rng = _rng(ctx.seed, _NOISE, ctx.round_index, client_id)
        delta = clip_and_noise(
            update=delta, clip=spec.dp_clip, noise_multiplier=spec.dp_noise_multiplier, rng=noise_rng
        )
    rows = len(data[1])
    if spec.secure_aggregation:
        mask = pairwise_mask(
            client_id=client_id,
            participants=ctx.participants,
            size=len(delta),
            round_index=ctx.round_index,
            seed=ctx.seed,
        )
        delta = mask_update(update=delta, weight=rows, mask=mask, participants=len(ctx.participants))
    return LocalResult(
        client_id=client_id,
        update=delta,
        rows=rows,
        masked=spec.secure_aggregation,
        loss_sum=loss_sum,
        correct=correct,
        samples=rows * spec.local_epochs,
        steps=steps,
    )


def _local_sgd(
    model: nn.Module, *, data: tuple[np.ndarray, np.ndarray], spec: FedAvgSpec
) -> tuple[float, int, int]:
    """E epochs of plain SGD with batch B (0: full batch); returns (sum of loss*n, correct, steps)."""
    x, y = _tensor(data[0]), _tensor(data[1])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=spec.client_lr)
    batch = spec.local_batch_size or len(x)
    loss_sum, correct, steps = 0.0, 0, 0
    for _ in range(spec.local_epochs):
        # A full batch keeps row order: FedSGD then sums exactly like a centralised full-batch step.
        perm = torch.randperm(len(x)) if batch < len(x) else torch.arange(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
            steps += 1
    return loss_sum, correct, steps


@torch.no_grad()
def evaluate_weights(
    *, model: nn.Module, weights: np.ndarray, data: tuple[np.ndarray, np.ndarray]
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``weights`` on ``data`` = (features, labels)."""
    set_weights(model, weights)
    model.eval()
    logits = model(_tensor(data[0]))
    labels = _tensor(data[1])
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


def federated_training(
    *,
    spec: FedAvgSpec,
    init: np.ndarray,
    seed: int,
    run_clients: RunClients,
    evaluate: Evaluate,
    emit: Callable[[dict], None] | None = None,
    stop: Callable[[EpochMetrics], bool] | None = None,
) -> FederatedRun:
    """The server's loop: sample, run the clients, average, evaluate; one EpochMetrics per round.

    ``run_clients`` and ``evaluate`` decide where the work runs (Dask tasks in :func:`run_fedavg`,
    plain calls in bench/fedavg_table.py). ``step`` in the metrics counts local SGD steps summed
    over all clients so far. ``stop(metrics)`` returning True ends the run after that round.
    """
    weights, history, steps, samples = init.astype(np.float32), [], 0, 0
    for r in range(1, spec.rounds + 1):
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
    if not client.scheduler_info()["workers"]:
        raise TrainingError(
            "the Dask cluster has no workers; start some (mms stack up, MMS_N_WORKERS) and retry"
        )
    spec, seed = job.train.fedavg, job.train.seed
    manifest = load_manifest(job.manifest_uri)
    x, y = _train_rows(manifest)
    parts = partition(
        y,
        clients=spec.clients,
        scheme=spec.partition,
        alpha=spec.alpha,
        shards_per_client=spec.shards_per_client,
        seed=seed,
    )
    build = partial(build_model, spec=job.model, in_features=x.shape[1], n_classes=len(manifest.classes))
    model = _seeded_model(build, seed=seed)
    t0 = time.perf_counter()
    # Scattered once: each simulated client's rows stay on one worker for the whole run.
    data = client.scatter([(x[p], y[p]) for p in parts], hash=False)
    val = client.scatter([read_shard(manifest.val)], hash=False)[0]

    run_clients, evaluate = _on_dask(
        client, build=build, data=data, val=val, spec=spec, threads=job.num_threads
    )
    try:
        run = federated_training(
            spec=spec,
            init=get_weights(model),
            seed=seed,
            run_clients=run_clients,
            evaluate=evaluate,
            emit=on_event,
        )
    finally:
        client.cancel([*data, val])
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


def _on_dask(
    client: Client, *, build: Callable[[], nn.Module], data: list, val: Any, spec: FedAvgSpec, threads: int
) -> tuple[RunClients, Evaluate]:
    """The round loop's two callbacks as Dask tasks on the scattered data."""

    def run_clients(weights: np.ndarray, ctx: RoundContext) -> list[LocalResult]:
        w = client.scatter(weights, hash=False)  # once per round, not once per client task
        futures = [
            client.submit(
                _with_model,
                local_update,
                build=build,
                num_threads=threads,
                pure=False,
                weights=w,
                data=data[k],
                spec=spec,
                client_id=k,
                ctx=ctx,
            )
            for k in ctx.participants
        ]
        return _gather(client, futures, what=f"round {ctx.round_index}: a client update")

    def evaluate(weights: np.ndarray) -> tuple[float, float]:
        fut = client.submit(
            _with_model,
            evaluate_weights,
            build=build,
            num_threads=threads,
            pure=False,
            weights=weights,
            data=val,
        )
        return _gather(client, [fut], what="evaluation")[0]

    return run_clients, evaluate


def _train_rows(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    parts = [read_shard(s) for s in manifest.train]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


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
