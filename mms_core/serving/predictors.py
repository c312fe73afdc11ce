"""The per-process cache of built models that every Dask-side predictor (batch, stream) shares, so a
worker builds each package's network once however many partitions or consumers it runs."""

from __future__ import annotations

from mms_core import storage
from mms_core.packaging import PackageConfig, Predictor

_PREDICTORS: dict[str, Predictor] = {}  # per worker process: content hash -> built model


def cached_predictor(*, config: PackageConfig, weights: bytes) -> Predictor:
    """The :class:`Predictor` for this package, built once per process (keyed by content hash)."""
    key = storage.canonical_hash(config.model_dump(mode="json")) + storage.sha256_bytes(weights)
    predictor = _PREDICTORS.get(key)
    if predictor is None:
        predictor = _PREDICTORS[key] = Predictor(config=config, weights=weights)
    return predictor
