"""Federated clients' rows on the Dask cluster, built from the training shards part by part.

No process reads the whole training set. One task reads the labels (all a partition needs: one
int64 per row) and assigns each row to a client. Then, for each worker, one task per part keeps
the rows of the clients that worker hosts, and one task per client joins its pieces. So a worker
holds about its clients' share of the rows plus one part, and the flow process holds none.

A client's rows come out in global row order (shards in manifest order, parts in order within a
shard): what indexing the concatenated training set with the partition's sorted indices gives.
Single-file and parted manifests of the same rows therefore train the same model, bit for bit.

Everything is a task result, never scattered data: when a worker dies, Dask recomputes the
clients it held from the shards on the workers that remain (and the partition, if it was
released), and spills them to disk under memory pressure like any other result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from distributed import Client, Future

from mms_core.data.shard import Manifest, PartInfo, read_part, read_part_labels
from mms_core.training.federated_math import partition, require_rows
from mms_core.training.spec import FedAvgSpec

Arrays = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class ClientData:
    """Futures of every client's (features, labels) and of the validation parts."""

    clients: list[Future]
    val: list[Future]
    val_rows: list[int]

    def futures(self) -> list[Future]:
        return [*self.clients, *self.val]


def place_clients(
    client: Client, *, manifest: Manifest, spec: FedAvgSpec, seed: int, workers: list[str]
) -> ClientData:
    """Build the clients' rows on the cluster. Client k lives on ``workers[k % len(workers)]``
    (a preference: Dask may move or recompute it elsewhere)."""
    parts = [p for info in manifest.train for p in info.part_list()]
    # Fail here, before any task, with the DataError the partition would raise on a worker.
    require_rows(
        sum(p.rows for p in parts),
        clients=spec.clients,
        scheme=spec.partition,
        shards_per_client=spec.shards_per_client,
    )
    starts = np.cumsum([0] + [p.rows for p in parts])[:-1]
    near = {"allow_other_workers": True, "pure": False}
    owner = client.submit(_owner_of_rows, parts, spec=spec, seed=seed, pure=False)
    clients: list[Future | None] = [None] * spec.clients
    for i, w in enumerate(workers):
        hosted = list(range(i, spec.clients, len(workers)))
        if not hosted:
            continue
        # Held only as dependencies of the joins: Dask frees them once every client is joined.
        pieces = [
            client.submit(_pieces_of_part, p, owner, start=int(s), hosted=hosted, workers=[w], **near)
            for p, s in zip(parts, starts, strict=True)
        ]
        for k in hosted:
            clients[k] = client.submit(_join, pieces, k, workers=[w], **near)
    val = manifest.val.part_list()
    return ClientData(
        clients=clients,  # type: ignore[arg-type]  # every slot is filled: the workers cover all k
        val=[client.submit(read_part, p, pure=False) for p in val],
        val_rows=[p.rows for p in val],
    )


def _owner_of_rows(parts: list[PartInfo], *, spec: FedAvgSpec, seed: int) -> np.ndarray:
    """Runs on a worker: the client of every training row (int32, global row order)."""
    labels = np.concatenate([read_part_labels(p) for p in parts])
    owner = np.empty(len(labels), dtype=np.int32)
    split = partition(
        labels,
        clients=spec.clients,
        scheme=spec.partition,
        alpha=spec.alpha,
        shards_per_client=spec.shards_per_client,
        seed=seed,
    )
    for k, rows in enumerate(split):
        owner[rows] = k
    return owner


def _pieces_of_part(part: PartInfo, owner: np.ndarray, *, start: int, hosted: list[int]) -> dict[int, Arrays]:
    """Runs on a worker: the rows of one part that belong to the ``hosted`` clients, by client,
    each in row order. A part with none of their rows is not read."""
    ids = owner[start : start + part.rows]
    mine = np.flatnonzero(np.isin(ids, hosted))
    if len(mine) == 0:
        return {}
    x, y = read_part(part)
    order = mine[np.argsort(ids[mine], kind="stable")]  # grouped by client, row order within
    keys, firsts = np.unique(ids[order], return_index=True)
    bounds = [*firsts.tolist(), len(order)]
    return {
        int(k): (x[order[a:b]], y[order[a:b]]) for k, a, b in zip(keys, bounds[:-1], bounds[1:], strict=True)
    }


def _join(pieces: list[dict[int, Arrays]], k: int) -> Arrays:
    """Runs on a worker: client ``k``'s pieces, concatenated in part order."""
    mine = [p[k] for p in pieces if k in p]
    if len(mine) == 1:
        return mine[0]
    return np.concatenate([m[0] for m in mine]), np.concatenate([m[1] for m in mine])
