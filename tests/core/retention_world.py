"""A small world for the retention tests: real MLflow versions (untrained MLP packages, so no
training), real shards, weights and checkpoints on disk, and a way to age files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mms_core import registry, storage
from mms_core.data.shard import ShardSpec, load_manifest, preprocess_and_shard
from mms_core.models import ModelSpec, build_model
from mms_core.packaging import PackageConfig
from mms_core.training.checkpoint import state_bytes

DAY = 86_400.0
FEATURES = ["f0", "f1", "f2", "f3"]


def table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(60, 4)).astype(np.float32), columns=FEATURES)
    df["label"] = np.arange(60) % 3
    return df


def make_shards(*, root: str, seed: int) -> tuple[str, str]:
    """Real shards of a small table; returns (shard directory URI, manifest hash)."""
    raw = storage.join(root, "raw", "table.parquet")
    if not storage.exists(raw):
        path = Path(raw)
        path.parent.mkdir(parents=True, exist_ok=True)
        table().to_parquet(path, index=False)
    manifest_uri = preprocess_and_shard(
        raw_uri=raw, source_sha256="0" * 64, label="label", spec=ShardSpec(n_shards=2, seed=seed), root=root
    )
    return manifest_uri.rsplit("/", 1)[0], load_manifest(manifest_uri).hash


def register(
    *, tracking_uri: str, artifact_root: str, name: str, run_name: str, tags: dict[str, str]
) -> tuple[str, str]:
    """Register one version of ``name`` from a fresh run; returns (version, run id)."""
    exp = registry.ensure_experiment(
        tracking_uri=tracking_uri, name="retention-tests", artifact_root=artifact_root
    )
    run_id = registry.start_run(
        tracking_uri=tracking_uri, experiment_id=exp, run_name=run_name, tags={}, params={}
    )
    spec = ModelSpec(name="mlp")
    config = PackageConfig(
        format="fp32", model=spec, features=FEATURES, classes=[0, 1, 2],
        mean=[0.0] * 4, std=[1.0] * 4,
    )  # fmt: skip
    weights = state_bytes(build_model(spec=spec, in_features=4, n_classes=3))
    version = registry.register_package(
        tracking_uri=tracking_uri, run_id=run_id, name=name, config=config, weights=weights,
        example=table()[FEATURES].head(3), tags={registry.TAG_VARIANT: "fp32", **tags},
    )  # fmt: skip
    registry.end_run(tracking_uri=tracking_uri, run_id=run_id)
    return version, run_id


def write_dir(uri: str, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(uri, name), data)
    return uri


def age(uri: str, *, at: float) -> None:
    """Set the modification time of ``uri`` and everything below it to ``at``."""
    for dirpath, _, filenames in os.walk(uri):
        for f in filenames:
            os.utime(Path(dirpath) / f, (at, at))
        os.utime(dirpath, (at, at))


def now_plus(days: float) -> float:
    return time.time() + days * DAY
