"""The tuning flow on real components: Prefect harness, Dask LocalCluster, MLflow and Optuna on
sqlite in MMS_HOME. The best trial's configuration is retrained and registered."""

import optuna
import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.tuning import tuning
from mms_core.errors import SpecError
from mms_core.tuning.space import load_tuning

FAST = [
    "training.epochs=4",
    "evaluate.min_accuracy=0.5",
    "registry.experiment=test-tuning",
    "tuning.trial_epochs=2",
    "tuning.sampler=random",
]


@pytest.mark.slow
def test_study_runs_trials_as_nested_runs_then_registers_the_best(mms_home):
    spec, tune = load_tuning("examples/digits-tune.yaml", overrides=FAST, trials=4)
    result = tuning(spec=spec, tune=tune)

    study = result.study
    assert study.completed + study.pruned + study.failed == 4 and study.completed >= 2
    assert result.best_spec is not None
    for name, value in study.best_params.items():  # the retrained spec is the best trial's
        section, _, rest = name.partition(".")
        node = result.best_spec.model_dump()[section]
        for key in rest.split("."):
            node = node[key]
        assert node == value, name
    assert result.best_spec.training.epochs == 4  # the full run's epochs, not the trials'

    mlflow = MlflowClient(tracking_uri=f"sqlite:///{mms_home / 'mlflow.db'}")
    parent = mlflow.get_run(result.study_run_id)
    assert parent.data.metrics["completed_trials"] == study.completed
    assert parent.info.status == "FINISHED"
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[parent.data.tags["mms.prefect_flow_run_id"]])
            )
        )
    states = {r.name.rsplit("-", 1)[0]: r.state.name for r in tasks}
    assert states["check-model"] == states["end-run"] == states["run-trials"] == "Completed"
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study.best_value)
    assert {"optimization_history.png", "param_importances.png"} <= {
        a.path for a in mlflow.list_artifacts(result.study_run_id)
    }
    trials = mlflow.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(trials) == 4
    states = {r.data.tags["mms.trial"]: r.data.tags["mms.trial_state"] for r in trials}
    assert states == {str(t.number): t.state for t in study.trials}
    for run in trials:
        if run.data.tags["mms.trial_state"] == "COMPLETE":
            assert run.info.status == "FINISHED" and "val_accuracy" in run.data.metrics

    stored = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{mms_home / 'optuna.db'}")
    assert len(stored.trials) == 4 and stored.best_value == pytest.approx(study.best_value)

    reg = result.retrained.registration
    assert reg.alias == "champion" and reg.version == "1"
    assert (
        mlflow.get_model_version_by_alias("digits-classifier", "champion").run_id == result.retrained.run_id
    )


def test_a_bad_space_fails_before_anything_runs(mms_home):
    spec, tune = load_tuning("examples/digits-tune.yaml", trials=2)
    bad = tune.model_copy(update={"params": {}})
    with pytest.raises(SpecError, match="tuning.params is empty"):
        tuning(spec=spec, tune=bad)
    assert not (mms_home / "mlflow.db").exists() and not (mms_home / "data").exists()
