"""Usage metering: per (key, model, version, hour) counters and the usage report that prices them.

Counters live in the metering database (see ``metering_db``). Nothing on the request path touches
the disk: ``UsageMeter.record`` only adds to an in-memory buffer that a background thread flushes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mms_core.errors import MeteringError
from mms_core.serving.metering.db import ANONYMOUS, connect, init_db, transaction

log = logging.getLogger(__name__)

_HOUR_S = 3600


@dataclass(frozen=True)
class UsageRow:
    """Usage of one key on one model version over a report's time range."""

    tenant: str
    key_id: str
    model: str
    version: str
    requests: int
    rows: int
    compute_ms: float
    cost: float


class UsageMeter:
    """Per (key_id, model, version, hour) counters: requests, rows, compute_ms.

    ``record`` adds to an in-memory buffer; ``flush`` (from the background thread that ``start``
    runs, or called directly) adds the buffer to the database in one transaction.

    Args:
        path: The SQLite file (created with its folder when missing).
        flush_interval_s: Seconds between background flushes: the most usage a crash can lose.
        clock: Wall-clock seconds since the epoch, which pick the hour bucket; tests pass a fake.
    """

    def __init__(
        self, *, path: Path, flush_interval_s: float = 5.0, clock: Callable[[], float] = time.time
    ) -> None:
        if flush_interval_s <= 0:
            raise MeteringError(f"flush_interval_s must be > 0, got {flush_interval_s}")
        self.path = Path(path)
        self._interval = flush_interval_s
        self._clock = clock
        self._lock = threading.Lock()  # guards the buffer; held for dict updates only, never for I/O
        self._flush_lock = threading.Lock()  # one flush at a time, so a failed one re-buffers in order
        self._buffer: dict[tuple[str, str, str, int], list] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        init_db(self.path)

    def record(self, *, key_id: str | None, model: str, version: str, rows: int, compute_ms: float) -> None:
        """Count one request (no I/O; safe from any thread). ``key_id=None`` counts as anonymous."""
        hour = int(self._clock()) // _HOUR_S * _HOUR_S
        bucket = (key_id or ANONYMOUS, model, str(version), hour)
        with self._lock:
            counts = self._buffer.get(bucket)
            if counts is None:
                self._buffer[bucket] = [1, rows, compute_ms]
            else:
                counts[0] += 1
                counts[1] += rows
                counts[2] += compute_ms

    def start(self) -> None:
        """Flush every ``flush_interval_s`` from a daemon thread until ``close`` (no-op when running)."""
        if self._stop.is_set():
            raise MeteringError("this UsageMeter is closed; create a new one")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mms-usage-flush", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.flush()
            except MeteringError as exc:  # counts stay buffered; the next tick retries
                log.warning("usage flush failed, will retry in %.1f s: %s", self._interval, exc)

    def flush(self) -> int:
        """Add the buffered counts to the database in one transaction.

        Returns:
            The number of (key, model, version, hour) rows written.

        Raises:
            MeteringError: The write failed; every count stays buffered for the next flush.
        """
        with self._flush_lock:
            with self._lock:  # swap, so record() never waits for the write
                pending, self._buffer = self._buffer, {}
            if not pending:
                return 0
            try:
                with transaction(self.path) as conn:
                    conn.executemany(_UPSERT, [(*bucket, *counts) for bucket, counts in pending.items()])
            except BaseException:
                self._rebuffer(pending)
                raise
            return len(pending)

    def _rebuffer(self, pending: dict[tuple[str, str, str, int], list]) -> None:
        with self._lock:
            for bucket, (requests, rows, compute_ms) in pending.items():
                counts = self._buffer.setdefault(bucket, [0, 0, 0.0])
                counts[0] += requests
                counts[1] += rows
                counts[2] += compute_ms

    def close(self) -> None:
        """Stop the background thread and flush what is left (call again to retry a failed flush).

        Raises:
            MeteringError: The final flush failed; the counts stay buffered.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()


_UPSERT = """
INSERT INTO usage_hourly (key_id, model, version, hour, requests, rows, compute_ms)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key_id, model, version, hour) DO UPDATE SET
    requests = requests + excluded.requests,
    rows = rows + excluded.rows,
    compute_ms = compute_ms + excluded.compute_ms
"""


def usage_report(
    *, path: Path, since: datetime, until: datetime | None = None, price_per_1k_rows: float
) -> list[UsageRow]:
    """Usage per key, model and version over a time range, with its cost.

    Usage is stored in whole hours, so the range is widened to whole hours at its start: an hour
    is counted when it starts at or after ``since`` rounded down to the hour, and before ``until``.

    Args:
        path: The metering database (a missing file reports no usage).
        since: Start of the range (timezone-aware).
        until: End of the range, exclusive (timezone-aware); None for no end.
        price_per_1k_rows: Price of 1,000 rows; ``cost = rows / 1000 * price_per_1k_rows``.

    Returns:
        One row per (key, model, version), sorted by tenant, key, model and version. Requests
        without a key appear under tenant and key ``anonymous``.

    Raises:
        MeteringError: A naive datetime, a negative price, or an unreadable database.
    """
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.utcoffset() is None:
            raise MeteringError(f"{name}={value} has no timezone; pass an aware datetime (e.g. tzinfo=UTC)")
    if price_per_1k_rows < 0:
        raise MeteringError(f"price_per_1k_rows must be >= 0, got {price_per_1k_rows}")
    if not Path(path).exists():
        return []
    start = int(since.timestamp()) // _HOUR_S * _HOUR_S
    end = until.timestamp() if until is not None else float("inf")
    with connect(Path(path)) as conn:
        rows = conn.execute(
            "SELECT COALESCE(k.tenant, CASE WHEN u.key_id = ? THEN ? ELSE 'unknown' END),"
            " u.key_id, u.model, u.version, SUM(u.requests), SUM(u.rows), SUM(u.compute_ms)"
            " FROM usage_hourly u LEFT JOIN api_keys k ON k.key_id = u.key_id"
            " WHERE u.hour >= ? AND u.hour < ? GROUP BY u.key_id, u.model, u.version",
            (ANONYMOUS, ANONYMOUS, start, end),
        ).fetchall()
    report = [
        UsageRow(*row[:6], compute_ms=float(row[6]), cost=row[5] / 1000 * price_per_1k_rows) for row in rows
    ]
    return sorted(report, key=lambda r: (r.tenant, r.key_id, r.model, r.version))
