"""The monitoring flow on Prefect's harness with a real MLflow store: live statistics from a real
online server (uvicorn on loopback, replicas on a LocalCluster) or from a real stream consumer's
files; no drift triggers nothing, drift logs the report and schedules one retraining run of the
training deployment on the fresh data; bad thresholds and a missing deployment fail before anything
runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from distributed import Client, LocalCluster
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterId,
)
from sklearn.datasets import load_digits

from flows.monitoring import monitoring
from flows.training_pipeline import training_pipeline
from mms_core import registry
from mms_core.config import Settings
from mms_core.monitoring.live import stream_stats_uri
from mms_core.monitoring.reference import ARTIFACT
from mms_core.monitoring.stats import RunningStats
from mms_core.serving.offline.stream import StreamOptions, consume
from mms_core.serving.online.app import ServedModel, create_app
from mms_core.serving.online.config import ServeConfig
from mms_core.spec import PipelineSpec

_spec = importlib.util.spec_from_file_location(
    "serving_conftest", Path(__file__).resolve().parents[1] / "core/serving/conftest.py"
)
serving = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serving)
NAME = "digits-classifier"
MODEL = f"{NAME}@champion"
DIGITS = load_digits()
X, Y = DIGITS.data.astype(np.float32), DIGITS.target
TRAIN = 1200  # the reference is the first 1200 digits; the other 597 are live traffic


@pytest.fixture(scope="module")
def cluster():
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as c,
        Client(c) as client,
    ):
        yield client


@pytest.fixture
def champion(mms_home):
    """The digits model registered as champion, with training statistics and the spec logged on its
    run the way the training pipeline does; the training deployment applied to the harness."""
    tracking = f"sqlite:///{mms_home / 'mlflow.db'}"
    serving.register_digits(
        tracking_uri=tracking, artifact_root=(mms_home / "artifacts").as_uri(), seed=0, alias="champion"
    )
    package, weights, version = registry.load_package(tracking_uri=tracking, model=MODEL)
    reference = RunningStats(features=package.features, mean=package.mean, std=package.std)
    reference.update(X[:TRAIN], Y[:TRAIN])
    run_id = registry.model_version(tracking_uri=tracking, model=MODEL).run_id
    data = reference.snapshot().model_dump_json().encode()
    registry.log_artifact_bytes(tracking_uri=tracking, run_id=run_id, name=ARTIFACT, data=data)
    registry.client(tracking_uri=tracking).log_param(run_id, "spec", PipelineSpec().model_dump_json())
    training_pipeline.to_deployment("manual").apply()
    return tracking, package, weights, version


def _retraining_runs() -> list:
    """Flow runs of the training-pipeline/manual deployment on the harness's server."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("training-pipeline/manual")
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        )


def _drop_runs(runs: list) -> None:
    with get_client(sync_client=True) as client:
        for run in runs:
            client.delete_flow_run(run.id)


def _artifact(state) -> str:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    return next(a.data for a in found if a.key == "monitoring-digits-classifier")


def test_no_drift_on_the_online_server_reports_health_and_triggers_nothing(champion, cluster, mms_home):
    tracking, package, weights, version = champion
    before = {r.id for r in _retraining_runs()}
    app = create_app(
        config=ServeConfig(replicas=1), model=ServedModel(name=NAME, version=version, package=package,
        weights=weights), scheduler_address=cluster.scheduler.address, keys=None, meter=None,
    )  # fmt: skip
    with serving.running_server(app) as url:
        for start in range(TRAIN, len(X), 50):
            body = {"inputs": X[start : start + 50].tolist()}
            assert httpx.post(f"{url}/v1/models/{NAME}/predict", json=body).status_code == 200
        assert httpx.post(f"{url}/v1/models/{NAME}/predict", json={"inputs": [[1.0]]}).status_code == 422
        state = monitoring(model=MODEL, server_url=url, fresh_data_uri="file:///fresh.csv", return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    assert (result.drifted, result.enough_data, result.live_rows) == (False, True, len(X) - TRAIN)
    assert result.retraining_flow_run_id is None and result.retraining == "not needed (no drift)"
    assert {r.id for r in _retraining_runs()} == before
    run = MlflowClient(tracking).get_run(result.mlflow_run_id)
    assert run.data.metrics["live_rows"] == len(X) - TRAIN and run.data.metrics["drifted"] == 0
    assert run.data.metrics["max_psi"] == pytest.approx(result.max_psi) and result.max_psi < 0.2
    assert run.data.metrics["error_rate"] == pytest.approx(1 / 13)  # the 422 among 13 requests
    artifacts = {a.path for a in MlflowClient(tracking).list_artifacts(result.mlflow_run_id)}
    assert artifacts == {"drift.png", "drift_report.md", "drift_report.json"}
    report = _artifact(state)
    assert f"## Monitoring {MODEL} (v{version}): no drift" in report
    assert "| requests | 13 |" in report and "| errors (rate) | 1 (7.69%) |" in report
    assert "Retraining: not needed (no drift)" in report


def _consume_shifted(package, weights, version: str, tmp: Path) -> None:
    """A real stream consumer answers brighter digits (a scanner drifted) and writes its statistics
    where `mms stream` puts them by default."""
    (tmp / "in").mkdir()
    brighter = np.clip(X[TRAIN:] * 1.6 + 3, 0, 25)
    lines = [
        json.dumps({"id": i, "inputs": brighter[i : i + 20].tolist()}) for i in range(0, len(brighter), 20)
    ]
    (tmp / "in" / "part-0.ndjson").write_text("\n".join(lines) + "\n")
    stats = stream_stats_uri(storage_root=Settings().storage_root, model=MODEL)
    consume(
        config=package, weights=weights, model_version=version, source=str(tmp / "in"), sink=str(tmp / "out"),
        options=StreamOptions(block_ms=50, idle_exit_s=0.2, stats_uri=stats),
    )  # fmt: skip


def test_drift_in_stream_statistics_schedules_one_retraining_on_the_fresh_data(champion, mms_home):
    tracking, package, weights, version = champion
    _consume_shifted(package, weights, version, mms_home)
    fresh = (mms_home / "fresh.csv").as_uri()
    before = {r.id for r in _retraining_runs()}

    state = monitoring(model=MODEL, server_url=None, fresh_data_uri=fresh, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result.drifted and len(result.drifted_features) > 10 and result.max_psi > 1
    new = [r for r in _retraining_runs() if r.id not in before]
    try:
        assert [str(r.id) for r in new] == [result.retraining_flow_run_id]
        (run,) = new
        spec = PipelineSpec.model_validate(run.parameters["spec"])
        assert spec.data.source == fresh and spec.registry.model_name == NAME
        assert "drift-retrain" in run.tags and run.state.is_scheduled()
        tags = MlflowClient(tracking).get_run(result.mlflow_run_id).data.tags
        assert tags["mms.retraining_flow_run_id"] == str(run.id) and tags["mms.drifted"] == "true"
        report = _artifact(state)
        assert (
            "**DRIFT**" in report
            and f"Retraining: started training-pipeline/manual flow run {run.id}" in report
        )

        # An hourly check while that run waits must not queue another one.
        again = monitoring(model=MODEL, server_url=None, fresh_data_uri=fresh, return_state=True).result()
        assert again.drifted and again.retraining_flow_run_id is None
        assert f"flow run {run.id} of training-pipeline/manual" in again.retraining
        assert [r.id for r in _retraining_runs() if r.id not in before] == [run.id]
    finally:
        _drop_runs(new)


def test_bad_input_fails_before_anything_runs(mms_home):
    bad = monitoring(thresholds={"psi": 0}, server_url=None, return_state=True)
    assert bad.is_failed() and "psi=0 is out of range: use a value in (0, 10]" in bad.message
    no_url = monitoring(server_url="127.0.0.1:8000", return_state=True)
    assert no_url.is_failed() and "must start with http://" in str(no_url.result(raise_on_failure=False))
    missing = monitoring(
        server_url=None, fresh_data_uri="file:///x.csv", retrain_deployment="training-pipeline/nope",
        return_state=True,
    )  # fmt: skip
    assert missing.is_failed()
    assert "'training-pipeline/nope' does not exist" in str(missing.result(raise_on_failure=False))
    assert not (mms_home / "mlflow.db").exists()  # nothing reached MLflow: no check ran
