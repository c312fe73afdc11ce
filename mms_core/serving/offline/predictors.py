"""The per-process cache of built models that every Dask-side predictor (batch, stream) shares, so a
worker builds each package's network once however many partitions or consumers it runs."""

from __future__ import annotations

from mms_core import storage
from mms_core.packaging import PackageConfig, Predictor

_PREDICTORS: dict[str, Predictor] = {}  # per worker process: content hash -> built model


def package_key(*, config: PackageConfig, weights: bytes) -> str:
    """Content hash of a package: compute it once on the client, not once per partition."""
    return storage.canonical_hash(config.model_dump(mode="json")) + storage.sha256_bytes(weights)


def cached_predictor(*, config: PackageConfig, weights: bytes, key: str | None = None) -> Predictor:
    """The :class:`Predictor` for this package, built once per process (keyed by content hash).

    ``key``: :func:`package_key` of the package, when the caller already has it (hashing large
    weights on every call would cost more than the cache saves).
    """
    key = key or package_key(config=config, weights=weights)
    predictor = _PREDICTORS.get(key)
    if predictor is None:
        predictor = _PREDICTORS[key] = Predictor(config=config, weights=weights)
    return predictor
