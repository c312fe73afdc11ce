"""The online server end to end on a real LocalCluster and a real uvicorn on 127.0.0.1: the same
answers as the model, every MLflow scoring format, dynamic batching under load, load spread over
replicas, a killed replica routed around with no failed request, and the bad-input matrix."""

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pandas as pd
import pytest

from mms_core.packaging import Predictor
from mms_core.serving.metering import KeyStore
from mms_core.serving.online.app import ServedModel, create_app
from mms_core.serving.online.config import ServeConfig


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        wanted = line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{")
        if wanted and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def server(dask_client, digits_package, serve_app) -> Iterator[str]:
    config, weights = digits_package
    app = create_app(
        config=ServeConfig(replicas=2, max_wait_ms=5, health_interval_s=0.3, health_timeout_s=2),
        model=ServedModel(name="digits", version="1", package=config, weights=weights),
        scheduler_address=dask_client.scheduler.address,
        keys=None,
        meter=None,
    )
    with serve_app(app) as url:
        yield url


def test_every_format_answers_what_the_model_answers(server, digits_package, digits_rows):
    config, weights = digits_package
    rows = digits_rows[:40]
    expected = Predictor(config=config, weights=weights).predict_array(rows).tolist()
    df = pd.DataFrame(rows, columns=config.features)
    bodies = {
        "inputs rows": {"inputs": rows.tolist()},
        "inputs columns": {"inputs": {c: df[c].tolist() for c in config.features}},
        "instances": {"instances": rows.tolist()},
        "dataframe_split": {"dataframe_split": json.loads(df.to_json(orient="split", index=False))},
        "dataframe_records": {"dataframe_records": df.to_dict(orient="records")},
    }
    for what, body in bodies.items():
        r = httpx.post(f"{server}/v1/models/digits/predict", json=body)
        assert r.status_code == 200, (what, r.text)
        assert r.json()["predictions"] == expected, what
        assert r.json()["version"] == "1"
    r = httpx.post(f"{server}/invocations", json=bodies["dataframe_split"])
    assert r.json()["predictions"] == expected


def test_stats_count_every_predicted_row_for_monitoring(server, digits_package, digits_rows):
    config, weights = digits_package
    before = httpx.get(f"{server}/v1/models/digits/stats").json()
    rows = digits_rows[100:160]
    r = httpx.post(f"{server}/v1/models/digits/predict", json={"inputs": rows.tolist()})
    assert r.status_code == 200
    after = httpx.get(f"{server}/v1/models/digits/stats").json()
    assert after["rows"] - before["rows"] == 60 and after["features"] == config.features
    added = Counter({k: n - before["classes"].get(k, 0) for k, n in after["classes"].items()})
    assert +added == Counter(str(p) for p in r.json()["predictions"])
    per_feature = [sum(a) - sum(b) for a, b in zip(after["counts"], before["counts"], strict=True)]
    assert per_feature == [60] * 64
    assert after["version"] == "1" and httpx.get(f"{server}/v1/models/digits/stats?version=1").json() == after
    missing = httpx.get(f"{server}/v1/models/other/stats")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_model"
    other = httpx.get(f"{server}/v1/models/digits/stats", params={"version": "9"})
    assert other.status_code == 404 and "has served ['1']" in other.json()["error"]["message"]


def test_mlflow_scoring_client_works_unchanged(server, digits_package, digits_rows):
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    config, weights = digits_package
    host, port = server.removeprefix("http://").split(":")
    client = ScoringServerClient(host, int(port))
    client.wait_server_ready(timeout=10)
    df = pd.DataFrame(digits_rows[:25], columns=config.features)
    result = client.invoke(df)
    expected = Predictor(config=config, weights=weights).predict_array(digits_rows[:25]).tolist()
    assert result["predictions"] == expected


def test_concurrent_load_forms_batches_and_spreads_over_replicas(server, digits_rows):
    before = httpx.get(f"{server}/health").json()["replicas"]

    with httpx.Client(limits=httpx.Limits(max_connections=32)) as http:

        def one(i: int) -> int:
            body = {"inputs": [digits_rows[i].tolist()]}
            return http.post(f"{server}/v1/models/digits/predict", json=body).status_code

        with ThreadPoolExecutor(32) as pool:
            codes = list(pool.map(one, range(600)))
    assert set(codes) == {200}
    text = httpx.get(f"{server}/metrics").text
    count = metric(text, "mms_batch_rows_count", version="1")
    rows = metric(text, "mms_batch_rows_sum", version="1")
    assert rows >= 600 and count < rows, f"no batch larger than 1 formed: {count} batches for {rows} rows"
    assert metric(text, "mms_requests_total", endpoint="predict", code="200") >= 600
    assert "mms_replica_queue_depth" in text and "mms_request_latency_seconds_bucket" in text
    after = httpx.get(f"{server}/health").json()["replicas"]
    assert len(after) == len(before) == 2
    assert all(r["rows"] > 0 and r["rss_bytes"] > 10e6 for r in after), after  # both replicas took work
    assert "mms_replica_memory_bytes" in text


def test_bad_input_matrix_gets_json_errors_and_replicas_survive(server, digits_rows):
    url = f"{server}/v1/models/digits/predict"
    row = digits_rows[0].tolist()
    cases = [
        ({"inputs": [row[:10]]}, 422, "64 features"),
        ({"inputs": [["a"] * 64]}, 422, "must be a number"),
        ({"inputs": []}, 422, "empty"),
        ({"nothing": 1}, 422, "exactly one of the keys"),
        ({"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}, 422, "missing"),
    ]
    for body, status, words in cases:
        r = httpx.post(url, json=body)
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["error"]["message"]
    nan = httpx.post(url, content=b'{"inputs": [[NaN' + b", 0" * 63 + b"]]}")
    assert nan.status_code == 422 and "NaN" in nan.json()["error"]["message"]
    assert httpx.post(url, content=b"{not json").status_code == 400
    too_big = httpx.post(url, content=b" " * (4 * 1024 * 1024 + 10))
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "too_large"
    unknown = httpx.post(f"{server}/v1/models/other/predict", json={"inputs": [row]})
    assert unknown.status_code == 404 and "digits" in unknown.json()["error"]["message"]
    assert httpx.get(f"{server}/nope").json()["error"]["code"] == "http_error"
    assert httpx.post(url, json={"inputs": [row]}).status_code == 200  # nothing reached a replica badly


def test_full_queues_answer_503_with_retry_after(dask_client, digits_package, digits_rows, serve_app):
    config, weights = digits_package
    app = create_app(
        # One replica whose queue holds one 64-row request: a burst must be shed, not queued.
        config=ServeConfig(replicas=1, max_queue_rows=64, max_batch_size=64, max_inflight_batches=1),
        model=ServedModel(name="digits", version="1", package=config, weights=weights),
        scheduler_address=dask_client.scheduler.address,
        keys=None,
        meter=None,
    )
    body = {"inputs": digits_rows[:64].tolist()}
    with serve_app(app) as url, httpx.Client(limits=httpx.Limits(max_connections=24), timeout=30) as http:
        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(lambda _: http.post(f"{url}/invocations", json=body), range(240)))
        codes = Counter(r.status_code for r in responses)
        assert set(codes) <= {200, 503} and codes[200] > 0 and codes[503] > 0, codes
        shed = next(r for r in responses if r.status_code == 503)
        assert int(shed.headers["Retry-After"]) >= 1
        assert shed.json()["error"]["code"] == "overloaded"
        assert http.post(f"{url}/invocations", json=body).status_code == 200  # recovers once the burst ends


def test_keys_guard_predictions_and_the_admin_api(
    dask_client, digits_package, digits_rows, serve_app, tmp_path
):
    config, weights = digits_package
    keys = KeyStore(path=tmp_path / "metering.db")
    user, _ = keys.create(tenant="acme")
    admin, _ = keys.create(tenant="ops", admin=True)
    app = create_app(
        config=ServeConfig(replicas=1, require_key=True),
        model=ServedModel(name="digits", version="1", package=config, weights=weights),
        scheduler_address=dask_client.scheduler.address,
        keys=keys,
        meter=None,
    )
    body = {"inputs": digits_rows[:2].tolist()}
    with serve_app(app) as url:
        assert httpx.post(f"{url}/invocations", json=body).json()["error"]["code"] == "missing_key"
        bad = httpx.post(f"{url}/invocations", json=body, headers={"Authorization": "Basic abc"})
        assert bad.status_code == 401
        ok = httpx.post(f"{url}/invocations", json=body, headers={"Authorization": f"Bearer {user}"})
        assert ok.status_code == 200
        denied = httpx.get(f"{url}/admin/stats", headers={"Authorization": f"Bearer {user}"})
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "not_admin"
        stats = httpx.get(f"{url}/admin/stats", headers={"Authorization": f"Bearer {admin}"})
        assert stats.status_code == 200 and stats.json()["versions"]["1"]["requests"] >= 1
        traffic = httpx.put(
            f"{url}/admin/traffic", json={"shares": {"9": 1.0}}, headers={"Authorization": f"Bearer {admin}"}
        )
        assert traffic.status_code == 404 and "unknown version" in traffic.json()["error"]["message"]


def test_killed_replica_is_routed_around_without_failed_requests(
    dask_client, digits_package, digits_rows, serve_app
):
    config, weights = digits_package
    app = create_app(
        config=ServeConfig(replicas=2, health_interval_s=0.2, health_timeout_s=1, request_timeout_s=5),
        model=ServedModel(name="digits", version="7", package=config, weights=weights),
        scheduler_address=dask_client.scheduler.address,
        keys=None,
        meter=None,
    )
    expected = Predictor(config=config, weights=weights).predict_array(digits_rows[:8]).tolist()
    with serve_app(app) as url:
        replicas = httpx.get(f"{url}/health").json()["replicas"]
        pids = dask_client.run(os.getpid)
        stop = threading.Event()
        results: list[tuple[int, list]] = []

        def load() -> None:
            with httpx.Client() as http:
                while not stop.is_set():
                    r = http.post(
                        f"{url}/v1/models/digits/predict", json={"inputs": digits_rows[:8].tolist()}
                    )
                    results.append((r.status_code, r.json().get("predictions")))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        victim = next(iter(pids.values()))
        os.kill(victim, signal.SIGKILL)
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join(30)
        text = httpx.get(f"{url}/metrics").text
        after = httpx.get(f"{url}/health").json()["replicas"]
    codes = [c for c, _ in results]
    assert len(codes) > 50
    assert set(codes) == {200}, f"failed requests: {[c for c in codes if c != 200][:5]}"
    assert all(p == expected for _, p in results)
    assert metric(text, "mms_replica_failures_total", version="7") >= 1
    assert {r["id"] for r in after} != {r["id"] for r in replicas}  # a replacement was started
