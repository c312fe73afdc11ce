"""The parameter server's data-parallel side: how parameters are split into shards, and the loop
each worker task runs (pull, gradient on one batch, push) against the shard actors.

A :class:`ParamLayout` assigns whole parameter tensors to shards, balanced by size (largest
first, each to the lightest shard), and moves parameters, gradients and optimizer state between
a model and per-shard flat float32 vectors in one fixed order, so workers, shards and the
driver agree on what every element of a vector is.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mms_core.data.shard import load_manifest
from mms_core.data.stream import RankData, open_rank_data
from mms_core.data.stream import epoch_order as epoch_order  # re-exported: the order's old home
from mms_core.errors import TrainingError
from mms_core.models import build_model
from mms_core.training.loop import forward_loss, seed_dropout
from mms_core.training.param_server_actor import ServerPlan
from mms_core.training.spec import TrainJob


@dataclass(frozen=True)
class ParamLayout:
    """Which parameter tensors (by index in ``model.parameters()``) each shard holds."""

    shapes: tuple[tuple[int, ...], ...]
    shards: tuple[tuple[int, ...], ...]

    def sizes(self) -> list[int]:
        """Number of values per shard."""
        return [sum(int(np.prod(self.shapes[i])) for i in shard) for shard in self.shards]

    def split(self, model: nn.Module) -> list[np.ndarray]:
        """The model's parameters as one flat float32 vector per shard."""
        return self._flatten([p.detach() for p in model.parameters()])

    def grads(self, model: nn.Module) -> list[np.ndarray]:
        """The model's gradients as one flat float32 vector per shard (zeros where a parameter has none)."""
        return self._flatten(
            [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        )

    @torch.no_grad()
    def load(self, model: nn.Module, arrays: list[np.ndarray]) -> None:
        """Write per-shard vectors (from :meth:`split` or a shard) into the model's parameters."""
        params = list(model.parameters())
        for shard, arr in zip(self.shards, arrays, strict=True):
            flat = as_tensor(arr).to(params[0].device)
            offset = 0
            for i in shard:
                n = params[i].numel()
                params[i].copy_(flat[offset : offset + n].view_as(params[i]))
                offset += n

    def merge_optimizer_states(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """The shards' optimizer state_dicts as one for an optimizer over the whole model."""
        merged = {
            shard[int(j)]: per
            for shard, st in zip(self.shards, states, strict=True)
            for j, per in st["state"].items()
        }
        return {"state": merged, "param_groups": [_group(states[0], range(len(self.shapes)))]}

    def split_optimizer_state(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """A whole-model optimizer state_dict cut into one per shard (inverse of the merge)."""
        return [
            {
                "state": {j: state["state"][i] for j, i in enumerate(shard) if i in state["state"]},
                "param_groups": [_group(state, range(len(shard)))],
            }
            for shard in self.shards
        ]

    def _flatten(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        return [
            torch.cat([tensors[i].reshape(-1) for i in shard]).float().cpu().numpy() for shard in self.shards
        ]


def _group(state: dict[str, Any], params: range) -> dict[str, Any]:
    hyper = {k: v for k, v in state["param_groups"][0].items() if k != "params"}
    return {**hyper, "params": list(params)}


def plan_shards(*, model: nn.Module, shards: int) -> ParamLayout:
    """Split the model's parameter tensors across ``shards`` shards, balanced by size.

    Largest tensor first, each to the shard holding the fewest values so far (LPT scheduling:
    the largest shard is at most 4/3 of optimal); within a shard tensors keep model order.
    """
    params = list(model.parameters())
    if shards > len(params):
        raise TrainingError(
            f"training.param_server.shards={shards} but the model has only {len(params)} parameter "
            f"tensors (parameters are split by tensor): use at most {len(params)} shards"
        )
    loads = [0] * shards
    members: list[list[int]] = [[] for _ in range(shards)]
    for i in sorted(range(len(params)), key=lambda i: -params[i].numel()):
        s = min(range(shards), key=lambda s: (loads[s], len(members[s])))
        members[s].append(i)
        loads[s] += params[i].numel()
    return ParamLayout(
        shapes=tuple(tuple(p.shape) for p in params), shards=tuple(tuple(sorted(m)) for m in members)
    )


def run_worker(
    job: TrainJob, *, rank: int, plan: ServerPlan, layout: ParamLayout, shards: list[Any], start_clock: int
) -> dict[str, Any]:
    """Runs on a Dask worker: this rank's share of the training against the shard actors.

    Each step is one round trip per shard: the gradient goes out with a request for the next
    step's parameters, which the shard answers once the staleness bound allows. After each of
    its epochs the rank reports loss, accuracy, rows and staleness counts to shard 0.

    Returns:
        The rank's totals: steps, rows, seconds and its staleness histogram.
    """
    torch.set_num_threads(job.num_threads)
    model, data = _setup_rank(job, rank=rank, world_size=plan.world_size)
    t0, total, tally = time.perf_counter(), _Tally(), _Tally()
    pulled = [f.result() for f in [s.pull(clock=start_clock) for s in shards]]
    spe = plan.steps_per_epoch
    for clock in range(start_clock, plan.total_clocks):
        epoch, i = clock // spe + 1, clock % spe
        if i == 0 or clock == start_clock:  # the DDP loop's batches, so the two are comparable
            batches = data.batches(epoch=epoch, skip=i, n_steps=spe)
        grads = _gradient(
            job,
            rank=rank,
            clock=clock,
            model=model,
            layout=layout,
            pulled=pulled,
            batch=next(batches),
            tally=tally,
        )
        then = clock + 1 if clock + 1 < plan.total_clocks else None
        futures = [
            s.push(rank=rank, clock=clock, version=v, grad=g, then_pull=then)
            for s, (v, _), g in zip(shards, pulled, grads, strict=True)
        ]
        replies = [f.result() for f in futures]  # sent to all shards before waiting for any
        tally.staleness[max(stale for stale, _ in replies)] += 1  # a gradient's: its worst slice
        pulled = [reply for _, reply in replies]
        if i == spe - 1:
            shards[0].report(rank=rank, epoch=epoch, stats=tally.report()).result()
            total.merge(tally)
            tally = _Tally()
    return {
        "rank": rank,
        "steps": total.steps,
        "samples": total.count,
        "seconds": time.perf_counter() - t0,
        "staleness": total.report()["staleness"],
    }


def _setup_rank(job: TrainJob, *, rank: int, world_size: int) -> tuple[nn.Module, RankData]:
    """The model (its parameters are overwritten by every pull) and this rank's rows (whole on the
    device, or streamed: see mms_core.data.stream)."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    manifest = load_manifest(job.manifest_uri)
    data = open_rank_data(manifest=manifest, rank=rank, world_size=world_size, device=device, train=job.train)
    torch.manual_seed(job.train.seed)  # buffers (never pushed) start as on the driver
    model = build_model(spec=job.model, in_features=len(manifest.features), n_classes=len(manifest.classes))
    return model.to(device).train(), data


def _gradient(
    job: TrainJob,
    *,
    rank: int,
    clock: int,
    model: nn.Module,
    layout: ParamLayout,
    pulled: list[tuple[int, np.ndarray]],
    batch: tuple[torch.Tensor, torch.Tensor],
    tally: _Tally,
) -> list[np.ndarray]:
    """The gradient of one batch at the pulled parameters, one flat vector per shard."""
    layout.load(model, [arr for _, arr in pulled])
    seed_dropout(job.train.seed * 1_000_003 + clock * 131 + rank, device=batch[0].device)  # as the DDP loop
    with _autocast(batch[0].device, job.train.precision):
        loss, correct, count = forward_loss(model, *batch)
    model.zero_grad(set_to_none=True)
    loss.backward()
    tally.add(loss=float(loss.detach()) * count, correct=int(correct), count=count)
    return layout.grads(model)


class _Tally:
    """A rank's figures for one epoch (or the whole run): loss, accuracy, rows, staleness."""

    def __init__(self) -> None:
        self.loss_sum, self.correct, self.count, self.steps = 0.0, 0, 0, 0
        self.staleness: Counter = Counter()

    def add(self, *, loss: float, correct: int, count: int) -> None:
        self.loss_sum += loss
        self.correct += correct
        self.count += count
        self.steps += 1

    def merge(self, other: _Tally) -> None:
        self.loss_sum, self.correct = self.loss_sum + other.loss_sum, self.correct + other.correct
        self.count, self.steps = self.count + other.count, self.steps + other.steps
        self.staleness.update(other.staleness)

    def report(self) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum,
            "correct": self.correct,
            "count": self.count,
            "staleness": {str(k): int(v) for k, v in sorted(self.staleness.items())},
        }


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy``, copying arrays that are read-only (as Dask and Parquet can hand
    them over), which torch would otherwise warn about."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
