"""The served versions ("pools"): each version's package, replicas and traffic share, and a window
of its recent requests that a canary rollout reads (/admin/stats)."""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mms_core.packaging import PackageConfig
from mms_core.serving.online.errors import Conflict, UnknownVersion

if TYPE_CHECKING:
    from mms_core.serving.online.replicas import ReplicaState


@dataclass(eq=False)
class VersionPool:
    version: str
    package: PackageConfig
    weights: bytes
    wanted: int
    share: float = 0.0
    replicas: list[ReplicaState] = field(default_factory=list)
    loaded: bool = False
    removing: bool = False
    window: deque[tuple[float, float, bool]] = field(default_factory=lambda: deque(maxlen=200_000))

    @property
    def width(self) -> int:
        return len(self.package.features)


class Pools:
    """Versions by name, their shares of new traffic, and their request windows."""

    def __init__(self) -> None:
        self.by_version: dict[str, VersionPool] = {}

    def get(self, version: str) -> VersionPool | None:
        return self.by_version.get(version)

    def all(self) -> list[VersionPool]:
        return list(self.by_version.values())

    def require(self, version: str) -> VersionPool:
        pool = self.by_version.get(version)
        if pool is None:
            raise UnknownVersion(f"version {version} is not served; served: {sorted(self.by_version)}")
        return pool

    def add(self, pool: VersionPool) -> None:
        """Register ``pool`` (not yet loaded, share 0).

        Raises:
            Conflict: the version is served already, or takes other features than the served ones.
        """
        if pool.version in self.by_version:
            raise Conflict(f"version {pool.version} is already served; remove it first or pick another")
        for other in self.by_version.values():
            if other.package.features != pool.package.features:
                raise Conflict(
                    f"version {pool.version} takes different features than version {other.version}; "
                    "a rollout must keep the input schema (serve it under another name)"
                )
        self.by_version[pool.version] = pool

    def remove(self, version: str) -> None:
        self.by_version.pop(version, None)

    def shares(self) -> dict[str, float]:
        return {v: p.share for v, p in self.by_version.items() if not p.removing}

    def set_shares(self, shares: dict[str, float]) -> None:
        """Set each version's share of new requests (normalised to sum 1).

        Raises:
            UnknownVersion: a version that is not served.
            Conflict: a share that is negative, not finite, or all shares zero.
        """
        unknown = [v for v in shares if v not in self.by_version or self.by_version[v].removing]
        if unknown:
            raise UnknownVersion(f"unknown version(s) {unknown}; served: {sorted(self.shares())}")
        values = list(shares.values())
        if not all(math.isfinite(s) and s >= 0 for s in values) or sum(values) <= 0:
            raise Conflict(f"traffic shares must be finite, >= 0 and sum to more than 0, got {shares}")
        total = sum(values)
        for version, share in shares.items():
            self.by_version[version].share = share / total

    def active(self) -> list[VersionPool]:
        return [p for p in self.by_version.values() if p.loaded and not p.removing]

    def pick(self) -> VersionPool | None:
        """A version for a new request, drawn by traffic share (a canary's share of requests)."""
        pools = [p for p in self.active() if p.share > 0]
        if not pools:
            return None
        return random.choices(pools, weights=[p.share for p in pools])[0]

    def in_order(self, first: VersionPool | None) -> list[VersionPool]:
        """``first``, then every other active version (used only when ``first`` has no replica left)."""
        lead = [first] if first is not None and not first.removing else []
        return lead + [p for p in self.active() if p is not first]

    @property
    def ready(self) -> bool:
        # A canary still loading does not make the server unready: its traffic share is still 0.
        active = self.active()
        return bool(active) and all(any(r.healthy for r in p.replicas) for p in active)

    def record(self, version: str, latency_ms: float, ok: bool) -> None:
        pool = self.by_version.get(version)
        if pool is not None:
            pool.window.append((time.monotonic(), latency_ms, ok))

    def stats(self, version: str, window_s: float) -> dict[str, float | int]:
        """Requests, error rate and latency percentiles of ``version`` over the last ``window_s``."""
        pool = self.require(version)
        since = time.monotonic() - window_s
        recent = [(ms, ok) for t, ms, ok in pool.window if t >= since]
        ms = np.asarray([m for m, _ in recent]) if recent else np.zeros(1)
        errors = sum(1 for _, ok in recent if not ok)
        return {
            "requests": len(recent),
            "errors": errors,
            "error_rate": errors / len(recent) if recent else 0.0,
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)),
        }
