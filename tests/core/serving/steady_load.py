"""Helpers for tests that serve the digits model while something happens to the cluster: the server
app on a given cluster, a steady request loop that keeps every answer, the answers the model itself
gives, and the wait for the replica set to be whole again."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import numpy as np
from distributed import Client
from fastapi import FastAPI

from mms_core.models import ModelSpec
from mms_core.packaging import PackageConfig, Predictor
from mms_core.serving.online.app import ServedModel, create_app
from mms_core.serving.online.config import ServeConfig

ROWS_PER_REQUEST = 8


def digits_server(
    client: Client,
    package: tuple[PackageConfig, bytes],
    *,
    version: str,
    model: ModelSpec | None = None,
    replicas: int = 2,
) -> FastAPI:
    """An online server app ("digits", two replicas, default settings) on ``client``'s cluster."""
    config, weights = package
    if model is not None:
        config = config.model_copy(update={"model": model})
    return create_app(
        config=ServeConfig(replicas=replicas),
        model=ServedModel(name="digits", version=version, package=config, weights=weights),
        scheduler_address=client.scheduler.address,
        keys=None,
        meter=None,
    )


@dataclass
class SteadyLoad:
    """One request of ``ROWS_PER_REQUEST`` rows every ``period_s`` from a thread, cycling through
    ``rows`` window by window; each answer is kept with its window."""

    url: str
    rows: np.ndarray
    period_s: float = 0.025
    answers: list[tuple[int, int, dict]] = field(default_factory=list)  # (window, status, body)
    between_requests: threading.Lock = field(default_factory=threading.Lock)  # held while one is out
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        windows = len(self.rows) // ROWS_PER_REQUEST
        with httpx.Client(timeout=60) as http:
            i = 0
            while not self._stop.is_set():
                t0 = time.monotonic()
                w = i % windows
                body = {"inputs": self.rows[w * ROWS_PER_REQUEST : (w + 1) * ROWS_PER_REQUEST].tolist()}
                with self.between_requests:
                    r = http.post(f"{self.url}/v1/models/digits/predict", json=body)
                self.answers.append((w, r.status_code, r.json()))
                i += 1
                self._stop.wait(max(0.0, self.period_s - (time.monotonic() - t0)))

    @contextmanager
    def running(self) -> Iterator["SteadyLoad"]:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(60)

    def failures(self) -> list[tuple[int, dict]]:
        """Every answer other than 200, with its body."""
        return [(status, body) for _, status, body in self.answers if status != 200]

    def wrong(self, expected: list[list[int]]) -> list[int]:
        """Windows answered 200 with predictions other than the model's own."""
        return [w for w, s, body in self.answers if s == 200 and body["predictions"] != expected[w]]


def expected_windows(package: tuple[PackageConfig, bytes], rows: np.ndarray) -> list[list[int]]:
    """The model's own labels for each request window of ``rows``, computed here."""
    labels = Predictor(config=package[0], weights=package[1]).predict_array(rows).tolist()
    return [labels[i : i + ROWS_PER_REQUEST] for i in range(0, len(labels), ROWS_PER_REQUEST)]


def wait_for_replicas(
    url: str, *, n: int, gone: set[str] = frozenset(), timeout_s: float = 60.0
) -> list[dict]:
    """The replica table once ``n`` healthy replicas serve, none of them one of ``gone``."""
    deadline = time.monotonic() + timeout_s
    while True:
        replicas = httpx.get(f"{url}/health").json()["replicas"]
        ids = {r["id"] for r in replicas}
        if len(replicas) == n and all(r["healthy"] for r in replicas) and not ids & gone:
            return replicas
        assert time.monotonic() < deadline, f"not back to {n} replicas: {replicas}"
        time.sleep(0.1)


def replica_failures(url: str) -> float:
    """The server's count of replicas taken out (``mms_replica_failures_total``, all versions)."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("mms_replica_failures_total{")
    )
