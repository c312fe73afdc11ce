"""The client side of federated averaging: what one simulated client does in a round (local
SGD from the global weights, then clipping, noise and masking of its update), and the flat
weight vector both sides exchange. Runs inside Dask tasks (fedavg.py) or plain calls (bench/).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mms_core.training.federated_math import (
    STREAM_NOISE,
    STREAM_SHUFFLE,
    clip_and_noise,
    mask_update,
    pairwise_mask,
    seeded_rng,
)
from mms_core.training.spec import FedAvgSpec


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
        stream = seeded_rng(ctx.seed, STREAM_SHUFFLE, ctx.round_index, client_id)
        torch.manual_seed(int(stream.integers(2**62)))
        loss_sum, correct, steps = _local_sgd(model, data=data, spec=spec)
    delta = get_weights(model).astype(np.float64) - weights.astype(np.float64)
    if spec.dp_clip is not None:
        noise_rng = seeded_rng(ctx.seed, STREAM_NOISE, ctx.round_index, client_id)
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
