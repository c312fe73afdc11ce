"""Running statistics of a model's inputs and predictions, comparable across training and serving.

Every feature is binned on the same fixed grid in training-standardised units (z = (x - mean) /
std, with the package's mean and std), so the training data at registration and the live traffic
of any number of predictors count into identical bins without sharing anything but the package.
A uniform reservoir of rows keeps a sample for the KS test. Snapshots are JSON (never pickle) and
merge exactly: counts add, reservoirs are resampled in proportion to the rows they stand for.
"""

from __future__ import annotations

import random
import threading

import numpy as np
from pydantic import BaseModel

from mms_core.errors import MonitoringError

# Bin edges in standard deviations from the training mean: 10 bins, the outer two open-ended.
Z_EDGES = np.array([-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0])
N_BINS = len(Z_EDGES) + 1
SAMPLE_ROWS = 500


class StatsSnapshot(BaseModel):
    """What a RunningStats has seen: JSON-able, mergeable."""

    features: list[str]
    version: str | None = None  # the model version whose inputs these are (None: training data)
    mean: list[float]
    std: list[float]
    rows: int = 0
    nan: list[int]
    counts: list[list[int]]  # per feature, N_BINS counts of finite values
    sample: list[list[float]]  # reservoir rows (<= sample_rows), raw units
    sample_rows: int = SAMPLE_ROWS
    classes: dict[str, int] = {}  # predicted (or, for training data, true) class -> rows


class RunningStats:
    """Thread-safe accumulator updated per request or batch (vectorised: ~tens of microseconds)."""

    def __init__(
        self, *, features: list[str], mean: list[float], std: list[float], sample_rows: int = SAMPLE_ROWS,
        version: str | None = None, seed: int = 0,
    ) -> None:  # fmt: skip
        self.features, self.sample_rows, self.version = list(features), sample_rows, version
        self._mean = np.asarray(mean, dtype=np.float64)
        self._std = np.where(np.asarray(std, dtype=np.float64) > 0, std, 1.0)
        self._rows = 0
        self._nan = np.zeros(len(features), dtype=np.int64)
        self._counts = np.zeros((len(features), N_BINS), dtype=np.int64)
        self._sample = np.empty((0, len(features)), dtype=np.float64)
        self._classes: dict[str, int] = {}
        self._offsets = np.arange(len(features)) * N_BINS
        self._rng = np.random.default_rng(seed)
        self._small_rng = random.Random(seed)  # scalar draws for one-row requests: 30x cheaper
        self._lock = threading.Lock()

    def update(self, x: np.ndarray, labels: np.ndarray | list | None = None) -> None:
        """Count the rows of ``x`` (raw feature units) and their predicted ``labels``."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, len(self.features))
        finite = np.isfinite(x)
        bins = np.searchsorted(Z_EDGES, (x - self._mean) / self._std, side="right")
        flat = (self._offsets + bins)[finite]
        add = np.bincount(flat, minlength=len(self.features) * N_BINS).reshape(len(self.features), N_BINS)
        with self._lock:
            self._counts += add
            self._nan += (~finite).sum(axis=0)
            self._reservoir(x)
            self._rows += len(x)
            if labels is not None:
                self._count_classes(np.asarray(labels))

    def _count_classes(self, labels: np.ndarray) -> None:
        if len(labels) <= 16:  # a request's few rows: a loop beats np.unique's sort
            pairs = [(k, 1) for k in labels.tolist()]
        else:
            keys, n = np.unique(labels, return_counts=True)
            pairs = zip(keys.tolist(), n.tolist(), strict=True)
        for k, c in pairs:
            key = str(k)
            self._classes[key] = self._classes.get(key, 0) + c

    def _reservoir(self, x: np.ndarray) -> None:
        # Algorithm R over the batch: row t (0-based over the stream) replaces a random slot with
        # probability sample_rows / (t + 1).
        free = max(self.sample_rows - len(self._sample), 0)
        if free:
            self._sample = np.vstack([self._sample, x[:free]])
        rest = x[free:]
        if 0 < len(rest) <= 8:
            for i, row in enumerate(rest):
                slot = self._small_rng.randrange(self._rows + free + i + 1)
                if slot < self.sample_rows:
                    self._sample[slot] = row
        elif len(rest):
            t = self._rows + free + np.arange(len(rest))
            slots = self._rng.integers(0, t + 1)
            keep = slots < self.sample_rows
            self._sample[slots[keep]] = rest[keep]

    @property
    def rows(self) -> int:
        """Rows counted so far (cheap: no snapshot)."""
        return self._rows

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(
                features=self.features, version=self.version, mean=self._mean.tolist(),
                std=self._std.tolist(), rows=self._rows, nan=self._nan.tolist(), counts=self._counts.tolist(),
                sample=np.nan_to_num(self._sample, nan=0.0, posinf=0.0, neginf=0.0).tolist(),
                sample_rows=self.sample_rows, classes=dict(self._classes),
            )  # fmt: skip


def merge(snapshots: list[StatsSnapshot], *, seed: int = 0) -> StatsSnapshot:
    """One snapshot standing for all of ``snapshots`` (e.g. several stream consumers, or a server and
    the consumers of the same model version).

    Raises:
        MonitoringError: nothing to merge, or snapshots binned differently (see :func:`check_same_bins`).
    """
    if not snapshots:
        raise MonitoringError("no statistics to merge")
    first = snapshots[0]
    for s in snapshots[1:]:
        check_same_bins(first, s, what="cannot merge statistics")
    rows = sum(s.rows for s in snapshots)
    rng = np.random.default_rng(seed)
    parts = []
    for s in snapshots:  # each reservoir contributes in proportion to the rows it stands for
        take = min(len(s.sample), round(first.sample_rows * s.rows / rows)) if rows else 0
        if take:
            parts.append(np.asarray(s.sample)[rng.choice(len(s.sample), take, replace=False)])
    classes: dict[str, int] = {}
    for s in snapshots:
        for k, n in s.classes.items():
            classes[k] = classes.get(k, 0) + n
    return first.model_copy(
        update={
            "rows": rows,
            "nan": np.sum([s.nan for s in snapshots], axis=0).tolist(),
            "counts": np.sum([s.counts for s in snapshots], axis=0).tolist(),
            "sample": np.vstack(parts).tolist() if parts else [],
            "classes": classes,
        }
    )


def check_same_bins(a: StatsSnapshot, b: StatsSnapshot, *, what: str) -> None:
    """Refuse to combine counts made on different grids: other features, or another training
    mean/std (a version trained on other data bins the same value elsewhere).

    Raises:
        MonitoringError: naming the difference and what to compare instead.
    """
    if a.features != b.features:
        odd = sorted(set(a.features) ^ set(b.features))[:5] or a.features[:5]
        raise MonitoringError(f"{what}: they describe different features (e.g. {odd}); same model only")
    if not (
        np.allclose(a.mean, b.mean, rtol=1e-5, atol=1e-6) and np.allclose(a.std, b.std, rtol=1e-5, atol=1e-6)
    ):
        raise MonitoringError(
            f"{what}: they were binned with different training mean/std (versions {a.version or 'training'} "
            f"and {b.version or 'training'} were trained on different data); compare a version's live "
            "statistics with that version's own training statistics"
        )
