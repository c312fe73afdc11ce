"""The per-process cache of built models that every Dask-side predictor (batch, stream) shares, so a
worker builds each package's network once however many partitions or consumers it runs."""

from __future__ import annotations

import threading
from collections import OrderedDict

from mms_core import storage
from mms_core.packaging import PackageConfig, Predictor

MAX_PREDICTORS = 4
"""Built models kept per process: a long-lived worker that serves version after version (rollouts,
batch jobs of many models) must not keep every network it ever built in memory."""

# Per worker process: content hash -> built model, least recently used first. An OrderedDict and
# not functools.lru_cache: the key is computed by the caller (package_key, hashed once on the client),
# while lru_cache would key on the arguments (unhashable config, the weights' bytes) and store the same
# package twice when called with and without ``key``.
_PREDICTORS: OrderedDict[str, Predictor] = OrderedDict()
_LOCK = threading.Lock()  # consumers and partitions run in several threads of one worker


def package_key(*, config: PackageConfig, weights: bytes) -> str:
    """Content hash of a package: compute it once on the client, not once per partition."""
    return storage.canonical_hash(config.model_dump(mode="json")) + storage.sha256_bytes(weights)


def cached_predictor(*, config: PackageConfig, weights: bytes, key: str | None = None) -> Predictor:
    """The :class:`Predictor` for this package, built once per process (keyed by content hash).

    At most :data:`MAX_PREDICTORS` built models are kept; the least recently used one goes first.

    Args:
        config: The package's configuration.
        weights: The package's safetensors bytes.
        key: :func:`package_key` of the package, when the caller already has it (hashing large
            weights on every call would cost more than the cache saves).

    Returns:
        The built predictor, shared by every caller in this process.
    """
    key = key or package_key(config=config, weights=weights)
    with _LOCK:
        predictor = _PREDICTORS.get(key)
        if predictor is not None:
            _PREDICTORS.move_to_end(key)
            return predictor
    # Built outside the lock: one slow build must not hold up threads that want another model. Two
    # threads building the same package at once both succeed; the last one stays cached.
    predictor = Predictor(config=config, weights=weights)
    with _LOCK:
        _PREDICTORS[key] = predictor
        _PREDICTORS.move_to_end(key)
        while len(_PREDICTORS) > MAX_PREDICTORS:
            _PREDICTORS.popitem(last=False)
    return predictor
