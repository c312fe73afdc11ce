"""The parameter-server shard: a Dask actor holding one slice of the model's parameters.

Each shard keeps its parameters as one flat float32 tensor (the per-parameter tensors the
optimizer sees are views into it), a version counter and the optimizer, which runs server-side
on the gradients workers push. Methods are coroutines, so a pull waiting on the staleness bound
parks on the worker's event loop instead of blocking the single thread Dask gives all actors of
a worker; the numeric work (optimizer step, copies) runs on the shard's own thread, so it
neither stalls the event loop nor races a concurrent pull.

Versions and clocks. A worker's t-th gradient has clock t (t = 0, 1, ...).
- Fully asynchronous (``staleness_bound=None``): each push is applied on arrival as one
  optimizer step, so the version counts pushes (world_size versions per clock).
- Bounded (``staleness_bound=S``): the server applies one step per clock, on the mean of the
  world_size gradients of that clock (summed in rank order, so the result does not depend on
  arrival order), so the version counts clocks. A worker may start clock t only once the
  version is at least t - S; its gradient is applied at version t, so its staleness is at most
  S. S=0 is synchronous SGD, step for step; S>0 lets fast workers run up to S clocks ahead
  (stale synchronous parallel, Ho et al. 2013) at the cost of buffering up to S+1 clocks of
  gradients per shard.
Staleness of a gradient = version when it is applied - version it was computed from: in
asynchronous mode the number of other pushes applied in between, in bounded mode whole clocks.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mms_core.training.optim import make_optimizer, make_scheduler
from mms_core.training.spec import TrainSpec


@dataclass(frozen=True)
class ServerPlan:
    """The run's shape in clocks (per-worker steps), shared by the driver, workers and shards."""

    world_size: int
    staleness_bound: int | None
    steps_per_epoch: int
    epochs: int
    checkpoint_every: int

    @property
    def versions_per_clock(self) -> int:
        """Server versions per clock: one aggregated step (bounded) or one step per push (async)."""
        return 1 if self.staleness_bound is not None else self.world_size

    @property
    def total_clocks(self) -> int:
        return self.epochs * self.steps_per_epoch

    def marks(self, *, after: int) -> list[int]:
        """Clocks after ``after`` at which the server is snapshotted: every epoch end and every
        ``checkpoint_every`` clocks (the driver evaluates and checkpoints there)."""
        ends = range(self.steps_per_epoch, self.total_clocks + 1, self.steps_per_epoch)
        every = range(self.checkpoint_every, self.total_clocks + 1, self.checkpoint_every or 1)
        picked = set(ends) | (set(every) if self.checkpoint_every else set())
        return sorted(c for c in picked if c > after)


@dataclass(frozen=True)
class Snapshot:
    """A shard's parameters and optimizer state at one version (for evaluation and checkpoints)."""

    version: int
    params: np.ndarray
    optimizer: dict[str, Any]


class ServerClosed(RuntimeError):
    """The run ended (finished or failed) while a call was waiting."""


class ParamShard:
    """One parameter-server shard (create with ``client.submit(ParamShard, ..., actor=True)``).

    Args:
        params: this shard's parameters, flat float32 (the layout's order).
        shapes: the shape of each parameter in ``params``, in order.
        train: the training settings (optimizer, lr, schedule, weight decay, timeout).
        plan: the run's shape (world size, staleness bound, epochs, checkpoints).
        start_clock: the clock to start at (nonzero when resuming from a checkpoint).
        optim_state: this shard's optimizer state_dict to resume from, or None.
    """

    def __init__(
        self,
        *,
        params: np.ndarray,
        shapes: list[tuple[int, ...]],
        train: TrainSpec,
        plan: ServerPlan,
        start_clock: int = 0,
        optim_state: dict[str, Any] | None = None,
    ) -> None:
        self._flat = torch.from_numpy(np.array(params, dtype=np.float32))  # own, writable copy
        sizes = [int(np.prod(s)) for s in shapes]
        self._shapes, self._offsets = shapes, np.cumsum([0, *sizes]).tolist()
        # Parameters alias slices of the flat buffer: the optimizer updates them in place.
        holder = nn.ParameterList(
            nn.Parameter(self._flat[a:b].view(s))
            for a, b, s in zip(self._offsets[:-1], self._offsets[1:], shapes, strict=True)
        )
        self._params = list(holder)
        self._optimizer = make_optimizer(holder, train)
        if optim_state is not None:
            self._optimizer.load_state_dict(optim_state)
        _, self._lr_factor = make_scheduler(
            self._optimizer, train, total_steps=plan.total_clocks * plan.versions_per_clock
        )
        self._lr, self._timeout = train.lr, train.timeout_s
        self._plan = plan
        self.version = start_clock * plan.versions_per_clock
        self._next_clock = start_clock  # bounded mode: the clock whose step is applied next
        self._pending: dict[int, dict[int, np.ndarray]] = {}
        self._marks = {c * plan.versions_per_clock for c in plan.marks(after=start_clock)}
        self._snapshots: dict[int, Snapshot] = {}
        self._reports: dict[int, dict[int, dict[str, Any]]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mms-param-shard")
        self._cond: asyncio.Condition | None = None  # bound to the worker's loop on first use
        self._closed = False

    # ---- called by workers ------------------------------------------------------------------

    async def pull(self, *, clock: int) -> tuple[int, np.ndarray]:
        """(version, parameters) for a worker about to compute its gradient of ``clock``.

        With a staleness bound S this waits until the version is at least ``clock - S``, at most
        ``training.timeout_s`` seconds (a slower worker may have died).
        """
        bound = self._plan.staleness_bound
        if bound is not None and self.version < clock - bound:
            await self._wait(lambda: self.version >= clock - bound, timeout=self._timeout)
        return await self._run(self._read)

    async def push(
        self, *, rank: int, clock: int, version: int, grad: np.ndarray, then_pull: int | None = None
    ) -> tuple[int, tuple[int, np.ndarray] | None]:
        """Hand in rank ``rank``'s gradient of ``clock``, computed on ``version``.

        Asynchronous mode applies it now; bounded mode buffers it until every rank's gradient of
        that clock is in (it is then applied at version ``clock``, by construction). With
        ``then_pull`` the reply also carries :meth:`pull` for that clock: one round trip per
        shard and step, and the worker's next gradient always sees its own last one.

        Returns:
            (staleness of this gradient, the pull's (version, parameters) or None).
        """
        self._check_open()
        if self._plan.staleness_bound is None:
            staleness = await self._run(self._apply, [grad], version)
            await self._notify()
        else:
            staleness = clock * self._plan.versions_per_clock - version
            self._pending.setdefault(clock, {})[rank] = grad
            while len(self._pending.get(self._next_clock, ())) == self._plan.world_size:
                ready = self._pending.pop(self._next_clock)
                self._next_clock += 1
                # Queued in clock order on the shard's single thread, which applies them in order.
                await self._run(self._apply, [ready[r] for r in sorted(ready)], None)
                await self._notify()
        return staleness, (None if then_pull is None else await self.pull(clock=then_pull))

    async def report(self, *, rank: int, epoch: int, stats: dict[str, Any]) -> None:
        """A worker's figures for one of its epochs (loss, accuracy, rows, staleness counts)."""
        self._reports.setdefault(epoch, {})[rank] = stats
        await self._notify()

    # ---- called by the driver ----------------------------------------------------------------

    async def snapshot(self, *, version: int) -> Snapshot:
        """The shard at ``version`` (one of the plan's marks), once the server has got there."""
        await self._wait(lambda: version in self._snapshots, timeout=None)
        return self._snapshots.pop(version)

    async def reports(self, *, epoch: int) -> dict[int, dict[str, Any]]:
        """Every rank's report for ``epoch`` (rank -> stats), once all of them are in."""
        await self._wait(lambda: len(self._reports.get(epoch, ())) == self._plan.world_size, timeout=None)
        return self._reports.pop(epoch)

    async def close(self) -> None:
        """End the run: every waiting and later call raises ServerClosed."""
        self._closed = True
        await self._notify()
        self._pool.shutdown(wait=False)

    # ---- internals ---------------------------------------------------------------------------

    def _read(self) -> tuple[int, np.ndarray]:
        return self.version, self._flat.numpy().copy()  # a copy: the next step updates in place

    def _apply(self, grads: list[np.ndarray], version: int | None) -> int:
        """One optimizer step on the mean of ``grads`` (runs on the shard's thread)."""
        staleness = 0 if version is None else self.version - version
        mean = grads[0].astype(np.float32, copy=True)
        for g in grads[1:]:
            mean += g
        if len(grads) > 1:
            mean /= np.float32(len(grads))
        flat_grad = torch.from_numpy(mean)
        for p, a, b, s in zip(self._params, self._offsets[:-1], self._offsets[1:], self._shapes, strict=True):
            p.grad = flat_grad[a:b].view(s)
        for group in self._optimizer.param_groups:
            group["lr"] = self._lr * self._lr_factor(self.version)
        self._optimizer.step()
        self.version += 1
        for group in self._optimizer.param_groups:  # as a scheduler would: the next step's lr
            group["lr"] = self._lr * self._lr_factor(self.version)
        if self.version in self._marks:
            self._snapshots[self.version] = Snapshot(
                version=self.version,
                params=self._flat.numpy().copy(),
                optimizer=copy.deepcopy(self._optimizer.state_dict()),
            )
        return staleness

    def _run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        self._check_open()
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def _notify(self) -> None:
        cond = self._condition()
        async with cond:
            cond.notify_all()

    async def _wait(self, ready: Callable[[], bool], *, timeout: float | None) -> None:
        cond = self._condition()
        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(lambda: ready() or self._closed), timeout)
            except TimeoutError:
                raise TimeoutError(
                    f"waited {timeout:.0f} s for the other workers at version {self.version} "
                    "(training.param_server.staleness_bound); a worker may have died or stalled: "
                    "raise training.timeout_s if they are just slow"
                ) from None
        self._check_open()

    def _check_open(self) -> None:
        if self._closed:
            raise ServerClosed("the parameter server was closed (the run ended or another worker failed)")
