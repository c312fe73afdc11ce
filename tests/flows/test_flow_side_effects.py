"""Flows do their side effects through Prefect tasks: each shows as a task run of the flow run,
and a transient fault is retried. The faults are real: MLflow's own tracking server (its app, in
this process, over the test's SQLite store) answering run updates with 503, as a server that is
restarting behind a proxy does; a Dask scheduler address that cannot work; a model path that does
not import. No training runs here: each flow fails before training or the task runs alone."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.training_pipeline import training_pipeline
from flows.tuning import tuning
from mms_core import registry
from mms_core.errors import ModelLoadError
from mms_core.serving.rollout import RolloutDecision, VersionStats
from mms_core.spec import load_spec
from mms_core.tuning.space import load_tuning
from tasks.common import end_run
from tasks.rollout import log_decision

BAD_SCHEDULER = "bogus://127.0.0.1:1"  # refused by distributed at once (a real address: 30 s)


def _task_runs(flow_run_id) -> dict[str, object]:
    """Task runs of the flow run by task name ("end-run-a1b" -> "end-run")."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    names = [r.name.rsplit("-", 1)[0] for r in runs]
    assert len(names) == len(set(names)), names
    return dict(zip(names, runs, strict=True))


def _only_run(mms_home, experiment: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{mms_home / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def test_end_run_retries_a_tracking_server_fault_and_the_run_ends_finished(tracking, mms_home):
    front, uri = tracking
    exp = registry.ensure_experiment(tracking_uri=uri, name="side-effects", artifact_root=None)
    run_id = registry.start_run(tracking_uri=uri, experiment_id=exp, run_name="r", tags={}, params={})
    front.failures = 1

    @flow
    def finish() -> None:
        end_run(tracking_uri=uri, run_id=run_id)

    state = finish(return_state=True)

    assert state.is_completed()
    (task_run,) = _task_runs(state.state_details.flow_run_id).values()
    assert task_run.name.startswith("end-run") and task_run.state.is_completed()
    assert task_run.run_count == 2 and front.updates == [503, 200]
    assert _only_run(mms_home, "side-effects").info.status == "FINISHED"


def test_a_failed_pipeline_ends_its_run_failed_through_a_retried_task(tracking, mms_home, monkeypatch):
    front, _ = tracking
    front.failures = 1
    monkeypatch.setenv("MMS_DASK_ADDRESS", BAD_SCHEDULER)  # fails in train, after the run started
    spec = load_spec(overrides=["registry.experiment=side-effects"])

    state = training_pipeline(spec=spec, return_state=True)

    assert state.is_failed()
    with pytest.raises(ValueError, match="unknown address scheme 'bogus'"):
        state.result()
    runs = _task_runs(state.state_details.flow_run_id)
    assert {n: r.state.name for n, r in runs.items()} == {
        "check-model": "Completed", "ingest": "Completed", "preprocess-and-shard": "Completed",
        "start-tracking": "Completed", "train": "Failed", "end-run": "Completed",
    }  # fmt: skip
    assert runs["end-run"].run_count == 2 and front.updates == [503, 200]
    assert _only_run(mms_home, "side-effects").info.status == "FAILED"


def test_a_run_that_cannot_be_ended_is_logged_and_the_flow_raises_its_own_error(
    tracking, mms_home, monkeypatch, caplog
):
    front, _ = tracking
    front.failures = 99  # the tracking server stays down: every attempt fails
    monkeypatch.setenv("MMS_DASK_ADDRESS", BAD_SCHEDULER)  # fails when the trials need the cluster
    spec, tune = load_tuning("examples/digits-tune.yaml", overrides=["registry.experiment=side-effects"])

    state = tuning(spec=spec, tune=tune, return_state=True)

    with pytest.raises(ValueError, match="unknown address scheme 'bogus'"):  # not MLflow's error
        state.result()
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["check-model"].state.is_completed() and runs["start-study-run"].state.is_completed()
    assert runs["end-run"].state.is_failed() and runs["end-run"].run_count == 4  # retries=3
    assert front.updates == [503] * 4
    assert "could not mark MLflow run" in caplog.text  # the flow run's log (sent to the API later)
    assert _only_run(mms_home, "side-effects").info.status == "RUNNING"


def test_log_decision_retries_and_leaves_the_attempt_it_could_not_finish_failed(tracking, mms_home):
    front, uri = tracking
    front.failures = 1  # the first run's end: that attempt's run is then marked FAILED
    stats = VersionStats(requests=10, errors=0, error_rate=0.0, p50_ms=1.0, p95_ms=2.0)
    decision = RolloutDecision(
        decision="promoted", model="m", new_version="2", previous_versions=["1"], canary=stats,
        current=stats, reasons=[],
    )  # fmt: skip

    @flow
    def log() -> str:
        return log_decision(tracking_uri=uri, artifact_root=None, decision=decision)

    state = log(return_state=True)

    run_id = state.result()
    (task_run,) = _task_runs(state.state_details.flow_run_id).values()
    assert task_run.name.startswith("log-decision") and task_run.run_count == 2
    assert front.updates == [503, 200, 200]
    client = MlflowClient(tracking_uri=f"sqlite:///{mms_home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("serving-rollouts").experiment_id])
    assert sorted((r.info.run_id == run_id, r.info.status) for r in runs) == [
        (False, "FAILED"),
        (True, "FINISHED"),
    ]
    assert client.get_run(run_id).data.metrics["canary_requests"] == 10


def test_a_bad_model_path_fails_in_the_check_model_task_without_retries(mms_home):
    spec = load_spec(overrides=["model.name=no_such_pkg.models:build"])

    state = training_pipeline(spec=spec, return_state=True)

    with pytest.raises(ModelLoadError, match="cannot import module 'no_such_pkg.models'"):
        state.result()
    runs = _task_runs(state.state_details.flow_run_id)
    assert list(runs) == ["check-model"]  # nothing else ran
    assert runs["check-model"].state.is_failed() and runs["check-model"].run_count == 1
