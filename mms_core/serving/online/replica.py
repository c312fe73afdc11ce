"""One model replica: a Dask actor holding a built Predictor on a worker.

The router batches requests before they get here (one Dask message per batch, not per request),
so the replica only runs forward passes. Sync methods run in the worker's single actor thread:
one forward pass at a time per replica, never on the worker's event loop; ``health`` is async,
so it answers at once even while a long batch runs.

An exception the model raises leaves as :class:`ModelFailed`, and only as that: the router tells
"this request broke the model" (500, the replica stays) from "the replica is lost" (any other
exception: a dead or closing worker, a closed connection; the request is retried elsewhere).
"""

from __future__ import annotations

import os
import time

import numpy as np
import psutil

from mms_core.packaging import PackageConfig, Predictor


class ModelFailed(Exception):
    """The model raised on a batch; the message is the model's own. The replica itself is fine."""


class Replica:
    """Built once on its worker; lives until the router releases its future."""

    def __init__(self, config_json: str, weights: bytes, version: str) -> None:
        self.version = version
        self.predictor = Predictor(config=PackageConfig.model_validate_json(config_json), weights=weights)
        self.batches = 0
        self.rows = 0
        self.started = time.time()

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """Labels for a batch of rows, and the forward pass's compute time in ms."""
        t0 = time.perf_counter()
        try:
            labels = self.predictor.predict_array(x)
        except Exception as exc:  # a string only: the original may not pickle back to the server
            raise ModelFailed(str(exc)) from None
        self.batches += 1
        self.rows += len(x)
        return labels, (time.perf_counter() - t0) * 1e3

    async def health(self) -> dict[str, float | int | str]:
        """Liveness plus the resource figures the router shows per replica."""
        proc = psutil.Process()
        return {
            "version": self.version,
            "pid": os.getpid(),
            "batches": self.batches,
            "rows": self.rows,
            "rss_bytes": proc.memory_info().rss,
            "cpu_seconds": sum(proc.cpu_times()[:2]),
        }
