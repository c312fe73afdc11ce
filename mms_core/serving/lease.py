"""Serving leases: a running `mms serve` names the model versions it serves in a small JSON file
under MMS_HOME/serving/leases, refreshed while it runs, so retention never deletes them.

A lease protects until its ``expires_at``: a server killed without removing its file stops
protecting its versions one TTL later, and a live server refreshes long before that.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from pydantic import BaseModel, ValidationError

LEASE_TTL_S = 60.0  # a server refreshes every TTL / 4, so a lease never lapses while it runs


class Lease(BaseModel):
    """Who serves what, and until when the claim holds."""

    model: str
    versions: list[str]
    pid: int
    expires_at: float


def lease_dir(home: Path) -> Path:
    return home / "serving" / "leases"


def new_lease_id() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_lease(
    *, home: Path, lease_id: str, model: str, versions: list[str], ttl_s: float = LEASE_TTL_S
) -> Path:
    """Write (or refresh) lease ``lease_id`` atomically; returns its path."""
    directory = lease_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    lease = Lease(model=model, versions=sorted(versions), pid=os.getpid(), expires_at=time.time() + ttl_s)
    path = directory / f"{lease_id}.json"
    tmp = directory / f".tmp-{lease_id}.json"
    tmp.write_text(lease.model_dump_json())
    os.replace(tmp, path)  # a reader sees the old lease or the new one, never half of one
    return path


def remove_lease(*, home: Path, lease_id: str) -> None:
    (lease_dir(home) / f"{lease_id}.json").unlink(missing_ok=True)


def active_leases(*, home: Path, now: float | None = None) -> list[Lease]:
    """Leases that have not expired at ``now`` (default: the wall clock). Unreadable files are skipped."""
    now = time.time() if now is None else now
    directory = lease_dir(home)
    if not directory.is_dir():
        return []
    leases = []
    for path in sorted(directory.glob("*.json")):
        if path.name.startswith(".tmp-"):
            continue
        try:
            lease = Lease.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError, ValidationError):
            continue  # removed or replaced while we read it: its writer rewrites it soon
        if lease.expires_at > now:
            leases.append(lease)
    return leases


@asynccontextmanager
async def held_lease(
    *, home: Path, model: str, versions: Callable[[], list[str]], ttl_s: float = LEASE_TTL_S
) -> AsyncIterator[None]:
    """Hold a lease on ``versions()`` of ``model`` while the block runs: written at once (claimed
    before anything loads), rewritten every ``ttl_s / 4`` with the versions then served (a rollout's
    new version is covered, a removed one released), removed at the end."""
    lease_id = new_lease_id()
    write_lease(home=home, lease_id=lease_id, model=model, versions=versions(), ttl_s=ttl_s)

    async def refresh() -> None:
        while True:
            await asyncio.sleep(ttl_s / 4)
            write_lease(home=home, lease_id=lease_id, model=model, versions=versions(), ttl_s=ttl_s)

    task = asyncio.create_task(refresh())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        remove_lease(home=home, lease_id=lease_id)
