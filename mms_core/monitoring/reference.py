"""The training data's statistics, saved with the registered run so monitoring can compare live
traffic against exactly what the model was trained on."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from mms_core import registry
from mms_core.data.shard import Manifest, iter_shard
from mms_core.errors import ModelLoadError
from mms_core.monitoring.stats import RunningStats, StatsSnapshot

ARTIFACT = "reference_stats.json"
REFERENCE_SAMPLE_ROWS = 2000


def reference_stats(manifest: Manifest) -> StatsSnapshot:
    """Statistics of the training shards in raw feature units, with the true class mix."""
    stats = RunningStats(
        features=manifest.features, mean=manifest.mean, std=manifest.std, sample_rows=REFERENCE_SAMPLE_ROWS
    )
    classes = np.asarray(manifest.classes, dtype=object)
    for shard in manifest.train:
        for x, y in iter_shard(shard):  # part by part: memory bounded by one part
            stats.update(np.asarray(x) * np.asarray(manifest.std) + np.asarray(manifest.mean), classes[y])
    return stats.snapshot()


def save_reference(*, tracking_uri: str, run_id: str, manifest: Manifest) -> None:
    """Log the training statistics as the run's ``reference_stats.json`` artifact (idempotent)."""
    snap = reference_stats(manifest)
    registry.log_artifact_bytes(
        tracking_uri=tracking_uri, run_id=run_id, name=ARTIFACT, data=snap.model_dump_json().encode()
    )


def load_reference(*, tracking_uri: str, model: str) -> tuple[StatsSnapshot, str, str]:
    """The training statistics of a registered model (``NAME@ALIAS`` or ``NAME/VERSION``).

    Returns (statistics, version, run id). Raises ModelLoadError when the version has none
    (registered before monitoring existed, or a language model): re-register it to monitor it.
    """
    version = registry.model_version(tracking_uri=tracking_uri, model=model)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = registry.client(tracking_uri=tracking_uri).download_artifacts(
                version.run_id, ARTIFACT, tmp
            )
        except Exception as exc:  # mlflow raises several types for a missing artifact
            raise ModelLoadError(
                f"{model} (version {version.version}) has no {ARTIFACT}: it was registered without "
                "training statistics; retrain or re-register it to monitor it"
            ) from exc
        data = json.loads(Path(path).read_text())
    return StatsSnapshot.model_validate(data), str(version.version), version.run_id
