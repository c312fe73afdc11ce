"""`mms serve` as a user runs it (the real console script, a tmp MMS_HOME with a registered model):
API keys and quota, requests in flight finished on SIGTERM, usage flushed and billed by `mms usage`."""

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

REPO = Path(__file__).resolve().parents[2]
MMS = str(Path(sys.executable).with_name("mms"))
DRAIN_S = 5

# Shared helpers of the serving tests (tests/ has no packages: --import-mode=importlib).
_spec = importlib.util.spec_from_file_location("serving_conftest", REPO / "tests/core/serving/conftest.py")
serving = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serving)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMS_", "PREFECT_"))}
    env.update(MMS_HOME=str(home), COLUMNS="200", PYTHONUNBUFFERED="1", MMS_SERVE_METERING_FLUSH_S="60")
    env.update(MMS_SERVE_DRAIN_S=str(DRAIN_S))
    return env


def _mms(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([MMS, *args], cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_serve_keys_quota_drain_and_usage(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    serving.register_digits(
        tracking_uri=f"sqlite:///{home / 'mlflow.db'}", artifact_root=(home / "artifacts").as_uri(),
        seed=0, alias="champion",
    )  # fmt: skip
    created = _mms("keys", "create", "--tenant", "acme", home=home)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    quota = _mms("keys", "create", "--tenant", "small", "--quota-rows-per-min", "20", home=home)
    small = quota.stdout.strip().splitlines()[-1]
    revoked = _mms("keys", "create", "--tenant", "gone", home=home).stdout.strip().splitlines()[-1]
    gone_id = "_".join(revoked.split("_")[1:3])
    assert _mms("keys", "revoke", gone_id, home=home).returncode == 0
    assert token not in (home / "metering.db").read_bytes().decode("latin-1")  # only hashes are stored

    port = serving.free_port()
    server = subprocess.Popen(
        [MMS, "serve", "--model", "digits-classifier@champion", "--port", str(port), "--require-key"],
        cwd=REPO, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()[-3000:]
            time.sleep(0.2)
        rows = load_digits().data[:5].astype(np.float32).tolist()
        predict = f"{url}/v1/models/digits-classifier/predict"

        def post(key: str | None, n: int = 5) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return httpx.post(predict, json={"inputs": rows[:n]}, headers=headers, timeout=30)

        assert post(None).status_code == 401
        assert post("mms_k_0000000000000000_" + "x" * 43).status_code == 401
        assert post(revoked).status_code == 403
        assert post(token).status_code == 200
        codes = [post(small).status_code for _ in range(6)]  # 5 rows each against 20 rows/min
        assert codes[:4] == [200] * 4 and 429 in codes[4:]
        over = post(small)
        assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1
        assert over.json()["error"]["code"] == "over_quota"

        # Requests in flight when SIGTERM arrives are answered before the server exits; malformed
        # ones mixed in fail alone.
        results: list[int] = []
        refused: list[int] = []
        bad = {"inputs": [[[0.5]] * 64]}  # the right length, but lists for numbers

        def load() -> None:
            with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
                for i in range(40):
                    try:
                        if i % 5 == 4:
                            refused.append(http.post(predict, json=bad).status_code)
                        else:
                            results.append(http.post(predict, json={"inputs": rows}).status_code)
                    except httpx.TransportError:
                        return  # the listener closed: the server stopped taking new requests

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for t in threads:
            t.join(60)
        out, _ = server.communicate(timeout=60)
        exit_s = time.monotonic() - signalled
        # uvicorn re-raises the signal after its graceful shutdown, as process managers expect.
        assert server.returncode in (0, -signal.SIGTERM), out[-3000:]
        assert "Application shutdown complete" in out
    finally:
        if server.poll() is None:
            server.kill()
    assert results and set(results) == {200}, results[:10]
    assert refused and set(refused) == {422}, refused
    # The server stops within the drain period; the embedded LocalCluster's close comes on top.
    assert exit_s < DRAIN_S + 10, exit_s

    report = _mms(
        "usage", "--since", datetime.now(UTC).strftime("%Y-%m-%d"), "--price-per-1k-rows", "2", home=home
    )
    assert report.returncode == 0, report.stderr
    acme = next(line for line in report.stdout.splitlines() if "acme" in line)
    served_rows = 5 * (1 + len(results))
    assert str(served_rows) in acme.split(), (served_rows, acme)
