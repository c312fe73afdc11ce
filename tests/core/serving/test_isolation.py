"""Requests fail alone, on a real LocalCluster and a real uvicorn on 127.0.0.1: malformed bodies of
every kind mixed into bursts of good traffic, a replica whose worker hangs, the drain after a stop
signal, the server-wide request cap, and the admin/tenant guards."""

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from mms_core.packaging import Predictor
from mms_core.serving.metering import KeyStore
from mms_core.serving.online.config import ServeConfig
from mms_core.serving.online.server import draining_server

JSON = {"content-type": "application/json"}


def malformed(row: list[float]) -> dict[str, tuple[bytes, dict[str, str], int]]:
    """Every kind of bad request a hostile or buggy client sends: name -> (body, headers, status)."""
    nums = ", ".join(["0"] * 63)
    return {
        "lists as values": (f'{{"inputs": [{[[0.5]] * 64}]}}'.encode(), JSON, 422),
        "wrong width": (f'{{"inputs": [{row[:10]}]}}'.encode(), JSON, 422),
        "string value": (b'{"inputs": [["a", ' + nums.encode() + b"]]}", JSON, 422),
        "bool value": (b'{"inputs": [[true, ' + nums.encode() + b"]]}", JSON, 422),
        "null value": (b'{"inputs": [[null, ' + nums.encode() + b"]]}", JSON, 422),
        "NaN token": (b'{"inputs": [[NaN, ' + nums.encode() + b"]]}", JSON, 422),
        "ragged rows": (f'{{"inputs": [{row}, {row[:3]}]}}'.encode(), JSON, 422),
        "deep nesting": (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", JSON, 400),
        "5000-digit int": (b'{"inputs": [[' + b"9" * 5000 + b", " + nums.encode() + b"]]}", JSON, 400),
        "huge float": (b'{"inputs": [[1e39, ' + nums.encode() + b"]]}", JSON, 422),
        "bad utf-8": (b'{"inputs": "\xff\xfe"}', JSON, 400),
        "not json": (b"{not json", JSON, 400),
        "empty body": (b"", JSON, 400),
        "text/plain": (f'{{"inputs": [{row}]}}'.encode(), {"content-type": "text/plain"}, 415),
        "csv": (b"a,b\n1,2\n", {"content-type": "text/csv"}, 415),
        "no format key": (b'{"rows": [[1]]}', JSON, 422),
        "empty rows": (b'{"inputs": []}', JSON, 422),
        "too many rows": (f'{{"inputs": {[row] * 20_001}}}'.encode(), JSON, 413),
    }


@pytest.fixture(scope="module")
def server(digits_app, serve_app):
    app = digits_app(replicas=2, max_wait_ms=5, health_interval_s=0.3, max_body_bytes=32 * 1024 * 1024)
    with serve_app(app) as url:
        yield url


def _settled(url: str, timeout_s: float = 5.0) -> list[dict]:
    """The replica table once every queue and in-flight count is back to zero."""
    deadline = time.monotonic() + timeout_s
    while True:
        replicas = httpx.get(f"{url}/health").json()["replicas"]
        if all(r["queued"] == 0 and r["inflight"] == 0 for r in replicas) or time.monotonic() > deadline:
            return replicas
        time.sleep(0.05)


def test_malformed_requests_in_bursts_of_good_traffic_fail_alone(server, digits_package, digits_rows):
    config, weights = digits_package
    rows = digits_rows[:40]
    expected = Predictor(config=config, weights=weights).predict_array(rows).tolist()
    bad = malformed(digits_rows[0].tolist())
    url = f"{server}/v1/models/digits/predict"
    with httpx.Client(limits=httpx.Limits(max_connections=48), timeout=30) as http:

        def good(i: int) -> tuple[int, list | None]:
            r = http.post(url, json={"inputs": [rows[i].tolist()]})
            return r.status_code, r.json().get("predictions")

        def poison(kind: str) -> tuple[str, int, dict]:
            body, headers, _ = bad[kind]
            r = http.post(url, content=body, headers=headers)
            return kind, r.status_code, r.json()

        for _ in range(5):  # five bursts, each 40 good requests with every malformed kind mixed in
            with ThreadPoolExecutor(48) as pool:
                goods = [pool.submit(good, i) for i in range(40)]
                bads = [pool.submit(poison, kind) for kind in bad]
                answers = [f.result() for f in goods]
                refused = [f.result() for f in bads]
            assert [a for a in answers if a[0] != 200] == []
            assert [a[1][0] for a in answers] == expected
            for kind, status, body in refused:
                assert status == bad[kind][2], (kind, status, body)
                assert body["error"]["message"], kind  # a message naming the problem
    replicas = _settled(server)
    assert len(replicas) == 2 and all(r["healthy"] for r in replicas)
    assert [(r["queued"], r["inflight"]) for r in replicas] == [(0, 0), (0, 0)]
    assert httpx.get(f"{server}/ready").status_code == 200
    text = httpx.get(f"{server}/metrics").text
    assert 'code="5' not in text, [line for line in text.splitlines() if 'code="5' in line]


def test_a_hung_replica_answers_504_within_the_deadline_and_is_replaced(
    dask_client, digits_app, digits_package, digits_rows, serve_app
):
    config, weights = digits_package
    app = digits_app(version="3", replicas=2, request_timeout_s=2, health_interval_s=0.3, health_timeout_s=5)
    expected = Predictor(config=config, weights=weights).predict_array(digits_rows[:4]).tolist()
    pids = dask_client.run(os.getpid)
    body = {"inputs": digits_rows[:4].tolist()}
    with serve_app(app) as url:
        before = httpx.get(f"{url}/health").json()["replicas"]
        victim = pids[before[0]["worker"]]
        os.kill(victim, signal.SIGSTOP)  # the forward pass (and everything else there) hangs
        try:
            results: list[tuple[int, float]] = []

            def one(_: int) -> None:
                t0 = time.monotonic()
                r = httpx.post(f"{url}/v1/models/digits/predict", json=body, timeout=30)
                results.append((r.status_code, time.monotonic() - t0))

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(40)))
            after = _settled(url)
            later = [httpx.post(f"{url}/v1/models/digits/predict", json=body, timeout=30) for _ in range(20)]
        finally:
            os.kill(victim, signal.SIGCONT)
    codes = Counter(code for code, _ in results)
    assert set(codes) <= {200, 504} and codes[504] >= 1, codes
    assert max(s for code, s in results if code == 504) < 2 + 1.5  # the deadline, plus scheduling slack
    assert before[0]["id"] not in {r["id"] for r in after} and len(after) == 2  # replaced
    assert all(r["worker"] != before[0]["worker"] for r in after)  # not on the hung worker
    assert [r.status_code for r in later] == [200] * 20 and all(
        r.json()["predictions"] == expected for r in later
    )
    assert [(r["queued"], r["inflight"]) for r in after] == [(0, 0), (0, 0)]


def test_stop_signal_drains_then_answers_the_rest_503_and_exits(dask_client, digits_app, digits_rows):
    serve = dict(replicas=1, request_timeout_s=60, drain_s=2, health_interval_s=30, port=0)
    server = draining_server(digits_app(version="4", **serve), config=ServeConfig(**serve))
    loop_ready = threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    async def run() -> None:
        loops.append(asyncio.get_running_loop())
        loop_ready.set()
        await server.serve()

    thread = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
    thread.start()
    loop_ready.wait(30)
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/models/digits/predict"
    worker = httpx.get(f"http://127.0.0.1:{port}/health").json()["replicas"][0]["worker"]
    victim = dask_client.run(os.getpid)[worker]
    os.kill(victim, signal.SIGSTOP)  # requests now hang in the replica's call
    try:
        with ThreadPoolExecutor(6) as pool:
            stuck = [
                pool.submit(httpx.post, url, json={"inputs": digits_rows[:2].tolist()}, timeout=30)
                for _ in range(6)
            ]
            time.sleep(0.5)
            t0 = time.monotonic()
            loops[0].call_soon_threadsafe(server.handle_exit, signal.SIGTERM, None)  # what SIGTERM runs
            thread.join(30)
            stopped_after = time.monotonic() - t0
            answers = [f.result() for f in stuck]
    finally:
        os.kill(victim, signal.SIGCONT)
    assert not thread.is_alive() and stopped_after < 2 + 2.5, stopped_after  # the drain period + slack
    assert [r.status_code for r in answers] == [503] * 6
    assert all("shutting down" in r.json()["error"]["message"] for r in answers)


def test_request_cap_answers_503_with_retry_after(digits_app, digits_rows, serve_app):
    app = digits_app(
        version="5", replicas=1, max_concurrent_requests=2, max_batch_size=1, max_inflight_batches=1
    )
    body = {"inputs": np.repeat(digits_rows[:1], 2000, axis=0).tolist()}
    with serve_app(app) as url, httpx.Client(limits=httpx.Limits(max_connections=16), timeout=30) as http:
        with ThreadPoolExecutor(16) as pool:
            codes = Counter(
                pool.map(lambda _: http.post(f"{url}/invocations", json=body).status_code, range(48))
            )
        capped = http.post(f"{url}/invocations", json=body)
        replicas = _settled(url)
    assert set(codes) <= {200, 503} and codes[200] >= 2 and codes[503] >= 1, codes
    assert capped.status_code == 200
    assert [(r["queued"], r["inflight"]) for r in replicas] == [(0, 0)]


def test_admin_needs_an_admin_key_on_loopback_and_samples_are_admin_only(
    digits_app, digits_rows, serve_app, tmp_path
):
    keys = KeyStore(path=tmp_path / "metering.db")
    user, _ = keys.create(tenant="acme")
    admin, _ = keys.create(tenant="ops", admin=True)
    app = digits_app(keys=keys, replicas=1)  # loopback: predictions without a key are fine
    as_user, as_admin = ({"Authorization": f"Bearer {k}"} for k in (user, admin))
    with serve_app(app) as url:
        assert httpx.post(f"{url}/invocations", json={"inputs": digits_rows[:3].tolist()}).status_code == 200
        assert httpx.get(f"{url}/admin/stats").status_code == 401
        assert httpx.get(f"{url}/admin/stats", headers=as_user).status_code == 403
        assert httpx.get(f"{url}/admin/stats", headers=as_admin).status_code == 200
        for shares in ({"1": -1.0}, {"1": "NaN"}, {"1": "Infinity"}, {}):
            r = httpx.put(f"{url}/admin/traffic", json={"shares": shares}, headers=as_admin)
            assert r.status_code == 422, (shares, r.text)
        nan = httpx.put(
            f"{url}/admin/traffic", content=b'{"shares": {"1": NaN}}', headers={**as_admin, **JSON}
        )
        assert nan.status_code == 422
        assert httpx.get(f"{url}/admin/stats", headers=as_admin).status_code == 200  # still answers
        anonymous = httpx.get(f"{url}/v1/models/digits/stats").json()
        tenant = httpx.get(f"{url}/v1/models/digits/stats", headers=as_user).json()
        admins = httpx.get(f"{url}/v1/models/digits/stats", headers=as_admin).json()
        assert anonymous["rows"] == tenant["rows"] == admins["rows"] == 3
        assert anonymous["sample"] == tenant["sample"] == [] and len(admins["sample"]) == 3
        rebinding = httpx.get(f"{url}/health", headers={"Host": "attacker.example"})
        assert rebinding.status_code == 400
        wrong = httpx.get(f"{url}/invocations")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


def test_quota_is_checked_before_the_body_and_key_misses_leave_the_event_loop(
    digits_app, digits_rows, serve_app, tmp_path
):
    lookups: list[str] = []

    class WatchedKeys(KeyStore):
        def verify(self, token: str):  # the database read a cache miss costs
            try:
                asyncio.get_running_loop()
                lookups.append("on the event loop")
            except RuntimeError:
                lookups.append("off the loop")
            return super().verify(token)

    keys = WatchedKeys(path=tmp_path / "metering.db")
    small, _ = keys.create(tenant="small", quota_rows_per_min=5)
    app = digits_app(keys=keys, replicas=1)
    headers = {"Authorization": f"Bearer {small}"}
    with serve_app(app) as url:
        first = httpx.post(f"{url}/invocations", json={"inputs": digits_rows[:5].tolist()}, headers=headers)
        garbage = httpx.post(f"{url}/invocations", content=b"{not json", headers={**headers, **JSON})
    assert first.status_code == 200
    assert garbage.status_code == 429 and garbage.json()["error"]["code"] == "over_quota"  # not parsed
    assert int(garbage.headers["Retry-After"]) >= 1
    # Only cache misses read the database, each on a worker thread, never on the server's loop.
    assert lookups and set(lookups) == {"off the loop"}, lookups
