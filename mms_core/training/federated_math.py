"""The arithmetic of federated averaging, pure numpy and testable without Dask or torch:
partitioning rows among clients, sampling a round's clients, the weighted average, clipping
plus Gaussian noise (differential privacy), and pairwise masks for secure aggregation
(Bonawitz et al. 2017) on fixed-point integers modulo 2**64. fedavg.py runs rounds with them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mms_core.errors import DataError, TrainingError
from mms_core.training.spec import FedAvgSpec

FRAC_BITS = 32  # fixed-point resolution 2**-32 for masked updates; their sum must stay below 2**30
# Separate random streams per purpose, so e.g. turning DP noise on does not change client sampling.
STREAM_PARTITION, STREAM_SAMPLE, STREAM_SHUFFLE, STREAM_NOISE, STREAM_MASK = range(5)


def seeded_rng(*entropy: int) -> np.random.Generator:
    """A generator for one purpose (a STREAM_* constant) and its coordinates (round, client...)."""
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
    require_rows(len(labels), clients=clients, scheme=scheme, shards_per_client=shards_per_client)
    rng = seeded_rng(seed, STREAM_PARTITION)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(labels)), clients)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, clients=clients, alpha=alpha, rng=rng)
    elif scheme == "shards":
        parts = _label_shards(labels, clients=clients, per_client=shards_per_client, rng=rng)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}: use 'iid', 'dirichlet' or 'shards'")
    return [np.sort(p) for p in parts]


def require_rows(n_rows: int, *, clients: int, scheme: str, shards_per_client: int) -> None:
    """Raise DataError (naming the setting to lower) when ``n_rows`` cannot be partitioned."""
    if n_rows < clients:
        raise DataError(
            f"{n_rows} training rows cannot give each of {clients} clients a row; "
            "lower training.fedavg.clients"
        )
    if scheme == "shards" and n_rows < clients * shards_per_client:
        raise DataError(
            f"{n_rows} training rows cannot fill {clients * shards_per_client} shards ({clients} clients x "
            f"{shards_per_client}); lower training.fedavg.clients or shards_per_client"
        )


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
    order = rng.permutation(len(labels))  # random order within each label
    order = order[np.argsort(labels[order], kind="stable")]
    shards = np.array_split(order, n_shards)
    dealt = rng.permutation(n_shards).reshape(clients, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in dealt]


def sample_clients(*, spec: FedAvgSpec, round_index: int, seed: int) -> tuple[int, ...]:
    """The max(1, round(C*K)) clients of a round, sorted; seeded by (seed, round)."""
    rng = seeded_rng(seed, STREAM_SAMPLE, round_index)
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
        shared = seeded_rng(seed, STREAM_MASK, round_index, lo, hi).integers(
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
