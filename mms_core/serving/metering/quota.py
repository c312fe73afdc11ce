"""Per-key row quotas: an in-memory token bucket (nothing on the request path touches the disk)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from mms_core.errors import MeteringError


class QuotaLimiter:
    """Token bucket per key: capacity = limit rows, refilled at limit/60 rows per second. In memory,
    thread-safe.

    A request larger than the whole limit could never fit in the bucket; rather than refuse it
    forever, it is admitted when the bucket is full and drains it below zero, so a big batch still
    passes but the key then waits as long as the batch would have taken at its quota.

    Args:
        clock: Monotonic seconds; tests pass a fake to advance time without sleeping.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key_id -> (tokens, at)

    def try_acquire(self, *, key_id: str, rows: int, limit_per_min: int) -> float:
        """Take ``rows`` tokens from the key's bucket if it holds them.

        Returns:
            0.0 when admitted (tokens taken); otherwise the seconds until the request would be
            admitted (for Retry-After), with nothing taken.

        Raises:
            MeteringError: A negative row count or a limit <= 0.
        """
        if rows < 0 or limit_per_min <= 0:
            raise MeteringError(f"rows must be >= 0 and limit_per_min > 0, got {rows} and {limit_per_min}")
        rate = limit_per_min / 60
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(key_id, (float(limit_per_min), now))
            tokens = min(float(limit_per_min), tokens + (now - at) * rate)
            need = min(rows, limit_per_min)  # an oversized request waits for a full bucket only
            if tokens >= need:
                self._buckets[key_id] = (tokens - rows, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (need - tokens) / rate

    def wait_s(self, *, key_id: str, limit_per_min: int) -> float:
        """Seconds until the key's bucket holds a token again (0.0: now); takes nothing. The server
        asks this before it reads a body, so a key over quota costs no parsing."""
        rate = limit_per_min / 60
        with self._lock:
            tokens, at = self._buckets.get(key_id, (float(limit_per_min), self._clock()))
            tokens = min(float(limit_per_min), tokens + (self._clock() - at) * rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / rate
