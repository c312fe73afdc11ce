"""The training-pipeline flow on examples/gpt-tiny.yaml: a language model on the standard
library's source, end to end on real components (Prefect harness, Dask LocalCluster, MLflow)."""

import math

import numpy as np
import pytest
from mlflow import MlflowClient

from flows.training_pipeline import training_pipeline
from mms_core import registry
from mms_core.data.shard import load_manifest, read_shard
from mms_core.packaging import Predictor
from mms_core.spec import load_spec


@pytest.mark.slow
def test_gpt_tiny_pipeline_trains_evaluates_per_token_and_registers(mms_home):
    spec = load_spec("examples/gpt-tiny.yaml", overrides=["registry.experiment=test-flows"])
    result = training_pipeline(spec=spec)

    ev = result.evaluation
    assert ev.perplexity == pytest.approx(math.exp(ev.loss)) and ev.perplexity < 20  # uniform: 256
    assert ev.tokens == ev.rows * 64 and ev.confusion == []
    assert result.registration.alias == "champion" and result.compression is not None

    client = MlflowClient(tracking_uri=result.tracking_uri)
    history = client.get_metric_history(result.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2] and history[1].value < history[0].value
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["test_perplexity"] == pytest.approx(ev.perplexity)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "training_curves.png" in artifacts and "confusion_matrix.png" not in artifacts

    # The registered package predicts the next token at every position of a window.
    config, weights, version = registry.load_package(
        tracking_uri=result.tracking_uri, model="gpt-tiny@champion"
    )
    x, _ = read_shard(load_manifest(result.manifest_uri).test)
    pred = Predictor(config=config, weights=weights).predict_array(x[:3])
    assert version == "1" and pred.shape == (3, 64)
    assert pred.min() >= 0 and pred.max() < 256
    assert np.mean(pred[:, :-1] == x[:3, 1:]) > 0.2  # mostly-right guesses of the shifted inputs
