"""Serving leases: a running app holds a lease naming its versions, refreshed, removed at shutdown."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.testclient import TestClient

from mms_core.serving.lease import active_leases, held_lease, lease_dir, write_lease


def test_app_holds_a_lease_while_it_runs_and_releases_it(tmp_path):
    served = ["3"]
    loaded: list[list[str]] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with held_lease(home=tmp_path, model="m", versions=lambda: list(served), ttl_s=0.2):
            loaded.extend(lease.versions for lease in active_leases(home=tmp_path))  # claimed first
            served.append("4")  # a rollout added v4 beside v3
            yield

    with TestClient(FastAPI(lifespan=lifespan)):
        assert loaded == [["3"]]
        deadline = time.monotonic() + 5
        while [lease.versions for lease in active_leases(home=tmp_path)] != [["3", "4"]]:
            assert time.monotonic() < deadline, "lease not refreshed with the served versions"
            time.sleep(0.02)
        assert active_leases(home=tmp_path)[0].model == "m"
    assert active_leases(home=tmp_path) == [] and list(lease_dir(tmp_path).glob("*.json")) == []


def test_expired_and_unreadable_leases_protect_nothing(tmp_path):
    write_lease(home=tmp_path, lease_id="live", model="m", versions=["1"])
    write_lease(home=tmp_path, lease_id="dead", model="m", versions=["2"], ttl_s=-1)
    (lease_dir(tmp_path) / "broken.json").write_text("{not json")
    assert [lease.versions for lease in active_leases(home=tmp_path)] == [["1"]]
    assert active_leases(home=tmp_path, now=time.time() + 3600) == []
