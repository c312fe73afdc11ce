"""Training statistics on real shards and a real MLflow store: computed in raw feature units from the
training shards, logged by register_trained with the run, read back by model reference; a version
registered without them is refused with the fix."""

import numpy as np
import pytest
import torch

from mms_core import registry, steps, storage
from mms_core.data.shard import load_manifest, read_shard
from mms_core.errors import ModelLoadError
from mms_core.evaluate import EvalSpec
from mms_core.models import ModelSpec, build_model
from mms_core.monitoring.reference import ARTIFACT, load_reference, reference_stats
from mms_core.monitoring.stats import N_BINS, RunningStats
from mms_core.spec import PipelineSpec, RegisterSpec
from mms_core.training.checkpoint import state_bytes

NAME = "monitored-digits"


def test_reference_counts_every_training_row_in_raw_units(digits_manifest):
    manifest = load_manifest(digits_manifest(2))
    ref = reference_stats(manifest)
    train = [read_shard(s) for s in manifest.train]
    y = np.concatenate([labels for _, labels in train])
    raw = np.concatenate([x for x, _ in train]) * np.asarray(manifest.std) + np.asarray(manifest.mean)
    assert ref.rows == len(y) == sum(s.rows for s in manifest.train)
    assert ref.classes == {
        str(manifest.classes[k]): int(n) for k, n in zip(*np.unique(y, return_counts=True), strict=True)
    }
    assert np.asarray(ref.counts).shape == (64, N_BINS) and ref.mean == manifest.mean
    # the same rows counted by a predictor-side accumulator land in the same bins
    live = RunningStats(features=manifest.features, mean=manifest.mean, std=manifest.std)
    live.update(raw)
    assert live.snapshot().counts == ref.counts
    assert (
        np.asarray(ref.sample).min() >= -0.001 and np.asarray(ref.sample).max() <= 16.001
    )  # pixel values 0..16


def test_register_trained_logs_them_and_they_load_by_model_reference(digits_manifest, tmp_path):
    uri, manifest_uri = f"sqlite:///{tmp_path / 'mlflow.db'}", digits_manifest(2)
    spec = PipelineSpec(
        evaluate=EvalSpec(min_accuracy=0.0), registry=RegisterSpec(model_name=NAME, experiment="monitoring")
    )
    torch.manual_seed(0)
    weights = f"{tmp_path}/model.safetensors"
    storage.write_bytes_atomic(
        weights, state_bytes(build_model(spec=ModelSpec(), in_features=64, n_classes=10))
    )
    exp = registry.ensure_experiment(
        tracking_uri=uri, name="monitoring", artifact_root=(tmp_path / "a").as_uri()
    )
    run_id = registry.start_run(tracking_uri=uri, experiment_id=exp, run_name="r", tags={}, params={})
    evaluation = steps.evaluate_trained(manifest_uri=manifest_uri, model=ModelSpec(), weights_uri=weights)
    result = steps.register_trained(
        tracking_uri=uri, run_id=run_id, spec=spec, manifest_uri=manifest_uri, weights_uri=weights,
        evaluation=evaluation, compressed=None, lineage={},
    )  # fmt: skip

    stats, version, source_run = load_reference(tracking_uri=uri, model=f"{NAME}@champion")
    assert (version, source_run) == (result.version, run_id)
    assert stats == reference_stats(load_manifest(manifest_uri))
    assert ARTIFACT in {a.path for a in registry.client(tracking_uri=uri).list_artifacts(run_id)}

    bare = registry.start_run(tracking_uri=uri, experiment_id=exp, run_name="bare", tags={}, params={})
    mv = registry.client(tracking_uri=uri).create_model_version(NAME, f"runs:/{bare}/model", run_id=bare)
    with pytest.raises(
        ModelLoadError, match="registered without training statistics; retrain or re-register"
    ):
        load_reference(tracking_uri=uri, model=f"{NAME}/{mv.version}")
    with pytest.raises(ModelLoadError, match="NAME@ALIAS or NAME/VERSION"):
        load_reference(tracking_uri=uri, model=NAME)
