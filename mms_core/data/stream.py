"""A training rank's rows, batch by batch, and the validation shard, with memory bounded by a
shuffle buffer instead of the shard.

One interface, :class:`RankData` (``batches(epoch=, skip=, n_steps=)``), two layouts:

- single-file shards (built-in datasets, every version-1 manifest): :class:`InMemoryRankData`
  reads the rank's rows whole onto the device and visits them in one seeded permutation per
  epoch (:func:`epoch_order`), exactly as the training loop did before streaming existed, so
  earlier results stay bit-identical;
- shards of parts (file sources): :class:`StreamedRankData`, one :class:`PartStream` per epoch.
  The rank's parts are shuffled (seeded by seed, epoch, rank), grouped in that order into
  windows of at most ``shuffle_buffer_rows`` rows (at least one part), the rows of a window are
  permuted (seeded by seed, epoch, rank, window) and batches are cut across window boundaries.

Either way an epoch is one fixed sequence of the rank's rows and batch ``i`` is its rows
``[i*batch_size, (i+1)*batch_size)``: resuming at step ``skip`` yields the same batches as the
uninterrupted epoch from there on. A stream finds the window where ``skip`` falls from row counts
alone, so the windows before it are never read.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset

from mms_core.data.shard import Manifest, PartInfo, ShardInfo, read_part, read_shard, shards_for_rank

Batch = tuple[torch.Tensor, torch.Tensor]
Arrays = tuple[np.ndarray, np.ndarray]  # features float32, labels int64
OnWindow = Callable[["Window", np.ndarray], None]  # a window and its features, as read


def epoch_seed(*, seed: int, epoch: int, rank: int) -> int:
    """The seed of a rank's epoch order (in memory: its rows; streamed: its parts)."""
    return seed * 100_003 + epoch * 1_009 + rank


def epoch_order(*, n_rows: int, seed: int, epoch: int, rank: int) -> torch.Tensor:
    """The order a rank visits its rows in an epoch when they are held in memory."""
    gen = torch.Generator().manual_seed(epoch_seed(seed=seed, epoch=epoch, rank=rank))
    return torch.randperm(n_rows, generator=gen)


def window_seed(*, seed: int, epoch: int, rank: int, window: int) -> int:
    """Seed of the row permutation inside one window: a hash, so that nearby (epoch, window)
    pairs give unrelated permutations, and non-negative below 2**63 as torch requires."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{rank}/{window}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def steps_per_epoch(manifest: Manifest, *, world_size: int, batch_size: int) -> int:
    """Same on every rank (else the all-reduce would hang): the smallest rank's batch count."""
    rows = [
        sum(s.rows for s in shards_for_rank(manifest, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    return max(1, min(math.ceil(n / batch_size) for n in rows))


class OrderSettings(Protocol):
    """What decides a rank's batches (``TrainSpec`` has these fields)."""

    seed: int
    batch_size: int
    shuffle_buffer_rows: int


class RankData(Protocol):
    """A rank's training rows, as the loop consumes them."""

    device: torch.device

    def batches(self, *, epoch: int, skip: int, n_steps: int) -> Iterator[Batch]:
        """Batches ``skip..n_steps-1`` of ``epoch`` on ``device`` (fewer if the rank runs out of rows)."""


class InMemoryRankData:
    """The rank's rows whole on the device, one permutation per epoch (the historical behaviour)."""

    def __init__(self, *, x: torch.Tensor, y: torch.Tensor, seed: int, rank: int, batch_size: int) -> None:
        self.x, self.y, self.device = x, y, x.device
        self.seed, self.rank, self.batch_size = seed, rank, batch_size

    def batches(self, *, epoch: int, skip: int, n_steps: int) -> Iterator[Batch]:
        """Slices of one seeded permutation; see :class:`RankData`."""
        b = self.batch_size
        perm = epoch_order(n_rows=len(self.x), seed=self.seed, epoch=epoch, rank=self.rank).to(self.device)
        for i in range(skip, n_steps):
            idx = perm[i * b : (i + 1) * b]
            yield self.x[idx], self.y[idx]


@dataclass(frozen=True)
class Window:
    """Consecutive parts (in an epoch's part order) shuffled together."""

    index: int
    parts: tuple[PartInfo, ...]
    start: int  # position of its first row in the epoch's sequence
    rows: int


def plan_windows(parts: list[PartInfo], *, max_rows: int) -> list[Window]:
    """Group ``parts`` in order into windows of at most ``max_rows`` rows; a part larger than that
    is a window on its own (parts are never split)."""
    windows: list[Window] = []
    group: list[PartInfo] = []
    start = rows = 0
    for part in parts:
        if group and rows + part.rows > max_rows:
            windows.append(Window(index=len(windows), parts=tuple(group), start=start, rows=rows))
            group, start, rows = [], start + rows, 0
        group.append(part)
        rows += part.rows
    if group:
        windows.append(Window(index=len(windows), parts=tuple(group), start=start, rows=rows))
    return windows


class PartStream(IterableDataset):
    """One epoch of a rank's parts as batches (CPU tensors); see the module doc for the order.

    Memory: the window being cut, the next one when ``prefetch`` (read on a thread while the
    current one trains) and one batch; never the shard. Every part's sha256 is checked as it is read.
    ``on_window(window, features)`` is called as each window is read (on the prefetch thread when
    ``prefetch``; the windows a resume skips are never read); it must not keep ``features``.
    Iterate it directly (or through a DataLoader with ``batch_size=None`` and no worker
    processes: it does not split itself across loader workers).
    """

    def __init__(
        self,
        *,
        parts: list[PartInfo],
        batch_size: int,
        n_steps: int,
        seed: int,
        epoch: int,
        rank: int,
        shuffle_buffer_rows: int,
        skip: int = 0,
        prefetch: bool = True,
        on_window: OnWindow | None = None,
    ) -> None:
        super().__init__()
        order = epoch_order(n_rows=len(parts), seed=seed, epoch=epoch, rank=rank).tolist()
        self.windows = plan_windows([parts[i] for i in order], max_rows=shuffle_buffer_rows)
        self.batch_size, self.n_steps, self.skip = batch_size, n_steps, skip
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.prefetch, self.on_window = prefetch, on_window

    def __iter__(self) -> Iterator[Batch]:
        b = self.batch_size
        total = sum(w.rows for w in self.windows)
        begin, end = self.skip * b, min(self.n_steps * b, total)
        needed = [w for w in self.windows if w.start < end and w.start + w.rows > begin]
        reader = self._read(needed)
        carry: Arrays | None = None
        for w in needed:
            x, y = next(reader)
            gen = torch.Generator().manual_seed(
                window_seed(seed=self.seed, epoch=self.epoch, rank=self.rank, window=w.index)
            )
            # Rows of the window outside [begin, end) belong to steps already done or not run.
            perm = torch.randperm(w.rows, generator=gen)[max(begin - w.start, 0) : end - w.start].numpy()
            carry = yield from _cut(x, y, perm=perm, carry=carry, batch_size=b)
            del x, y  # before the reader starts on the window after the next one
        reader.close()
        if carry is not None:  # the epoch's short last batch, as slicing a permutation gives it
            yield _tensors(carry)

    def _read(self, windows: list[Window]) -> Iterator[Arrays]:
        """The windows' rows in order; with prefetch the next one is read on a thread meanwhile."""
        if not self.prefetch:
            for w in windows:
                yield self._materialise(w)
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mms-prefetch")
        try:
            ahead: Future | None = pool.submit(self._materialise, windows[0]) if windows else None
            for k in range(len(windows)):
                current = ahead.result()
                ahead = pool.submit(self._materialise, windows[k + 1]) if k + 1 < len(windows) else None
                yield current
        finally:  # an abandoned epoch waits for at most the one read under way
            pool.shutdown(cancel_futures=True)

    def _materialise(self, w: Window) -> Arrays:
        arrays = [read_part(p) for p in w.parts]
        xy = arrays[0] if len(arrays) == 1 else _concat_all(arrays)
        if self.on_window is not None:
            self.on_window(w, xy[0])
        return xy


def _cut(
    x: np.ndarray, y: np.ndarray, *, perm: np.ndarray, carry: Arrays | None, batch_size: int
) -> Generator[Batch, None, Arrays | None]:
    """Yield the batches of rows ``perm`` of (x, y), the first one completing ``carry``; returns the
    rows left over (fewer than a batch, copied, so the window itself can be freed) or None."""
    b, i = batch_size, 0
    if carry is not None:
        i = min(b - len(carry[0]), len(perm))
        carry = _concat(carry, (x[perm[:i]], y[perm[:i]]))
        if len(carry[0]) < b:  # a window smaller than the batch's missing rows
            return carry
        yield _tensors(carry)
    full = (len(perm) - i) // b
    for j in range(i, i + full * b, b):
        yield _tensors((x[perm[j : j + b]], y[perm[j : j + b]]))
    rest = perm[i + full * b :]
    return (x[rest], y[rest]) if len(rest) else None


def _concat(a: Arrays, b: Arrays) -> Arrays:
    return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])


def _concat_all(arrays: list[Arrays]) -> Arrays:
    return np.concatenate([a[0] for a in arrays]), np.concatenate([a[1] for a in arrays])


def _tensors(xy: Arrays) -> Batch:
    return torch.from_numpy(xy[0]), torch.from_numpy(xy[1])


class StreamedRankData:
    """The rank's parts, streamed one :class:`PartStream` per epoch; batches moved to ``device``."""

    def __init__(
        self,
        *,
        parts: list[PartInfo],
        device: torch.device,
        seed: int,
        rank: int,
        batch_size: int,
        shuffle_buffer_rows: int,
        prefetch: bool = True,
    ) -> None:
        self.parts, self.device = parts, device
        self.seed, self.rank, self.batch_size = seed, rank, batch_size
        self.shuffle_buffer_rows, self.prefetch = shuffle_buffer_rows, prefetch

    def stream(self, *, epoch: int, skip: int, n_steps: int, on_window: OnWindow | None = None) -> PartStream:
        """The epoch's :class:`PartStream` from step ``skip`` (CPU tensors)."""
        return PartStream(
            parts=self.parts,
            batch_size=self.batch_size,
            n_steps=n_steps,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            shuffle_buffer_rows=self.shuffle_buffer_rows,
            skip=skip,
            prefetch=self.prefetch,
            on_window=on_window,
        )

    def batches(self, *, epoch: int, skip: int, n_steps: int) -> Iterator[Batch]:
        """See :class:`RankData`."""
        for x, y in self.stream(epoch=epoch, skip=skip, n_steps=n_steps):
            yield x.to(self.device), y.to(self.device)


def open_rank_data(
    *,
    manifest: Manifest,
    rank: int,
    world_size: int,
    device: torch.device,
    train: OrderSettings,
) -> RankData:
    """This rank's training rows: streamed when its shards have parts (file sources), else read
    whole onto ``device`` (single-file shards, where ``shuffle_buffer_rows`` plays no part)."""
    shards = shards_for_rank(manifest, rank=rank, world_size=world_size)
    seed, batch_size = train.seed, train.batch_size
    if any(s.parts for s in shards):
        return StreamedRankData(
            parts=[p for s in shards for p in s.part_list()],
            device=device,
            seed=seed,
            rank=rank,
            batch_size=batch_size,
            shuffle_buffer_rows=train.shuffle_buffer_rows,
        )
    arrays = [read_shard(s) for s in shards]
    x, y = (np.concatenate([a[k] for a in arrays]) for k in (0, 1))
    return InMemoryRankData(
        x=torch.tensor(x, device=device),
        y=torch.tensor(y, device=device),
        seed=seed,
        rank=rank,
        batch_size=batch_size,
    )


class ValSet:
    """The validation shard for repeated evaluation: held on ``device`` when it is one file (as
    before), read part by part on every pass when it has parts, so memory stays at one part."""

    def __init__(self, *, info: ShardInfo, device: torch.device) -> None:
        self.info, self.device = info, device
        self._whole = None if info.parts else self._to_device(read_shard(info))

    def chunks(self) -> Iterator[Batch]:
        """The shard's rows, in order, as (features, labels) on ``device``: one chunk per part."""
        if self._whole is not None:
            yield self._whole
            return
        for part in self.info.parts:
            yield self._to_device(read_part(part))

    def _to_device(self, xy: Arrays) -> Batch:
        return torch.tensor(xy[0], device=self.device), torch.tensor(xy[1], device=self.device)
