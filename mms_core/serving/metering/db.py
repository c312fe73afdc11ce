"""The metering database (MMS_HOME/metering.db): schema, connections and write transactions.

Keys and usage live in one SQLite file that the CLI and one or more servers open at the same time,
so the file runs in WAL mode (readers never block the writer) and every write is one short
``BEGIN IMMEDIATE`` transaction on a connection opened for that operation only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mms_core.errors import MeteringError


def metering_path(home: Path) -> Path:
    """The metering database of MMS_HOME ``home`` (keys and usage), its folder created."""
    home.mkdir(parents=True, exist_ok=True)
    return home / "metering.db"


ANONYMOUS = "anonymous"  # key_id and tenant of requests served without a key (loopback, auth off)
_BUSY_TIMEOUT_S = 10.0  # how long a writer waits for another process's transaction to finish

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    tenant TEXT NOT NULL,
    admin INTEGER NOT NULL,
    quota_rows_per_min INTEGER,
    created TEXT NOT NULL,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS usage_hourly (
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    hour INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    compute_ms REAL NOT NULL,
    PRIMARY KEY (key_id, model, version, hour)
);
"""


@contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection for one operation: closed at once so no process holds the file open between calls."""
    try:
        conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as exc:
        raise MeteringError(f"cannot open the metering database {path}: {exc}; check the path") from exc
    try:
        conn.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: a power cut loses at most the last txn
        yield conn
    except sqlite3.Error as exc:
        raise MeteringError(
            f"metering database {path} failed: {exc}; check that the file and its folder are writable "
            "and the disk is not full"
        ) from exc
    finally:
        conn.close()


@contextmanager
def transaction(path: Path) -> Iterator[sqlite3.Connection]:
    """One short write transaction; rolled back whole on any error."""
    with connect(path) as conn:
        # IMMEDIATE takes the write lock up front, so a busy database waits here (busy timeout)
        # instead of failing half-way through on a lock upgrade.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:  # SQLite already rolled back on some errors (e.g. disk full)
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def init_db(path: Path) -> None:
    """Create the folder, switch the file to WAL (a persistent setting) and create missing tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with connect(path) as conn:
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
