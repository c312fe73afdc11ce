"""Tasks of the tuning flow: the study's MLflow run, the trials on Dask, the study's plots."""

from __future__ import annotations

from distributed import Client
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mms_core import registry
from mms_core.spec import PipelineSpec
from mms_core.tuning.plots import study_pngs
from mms_core.tuning.space import TuneSpec
from mms_core.tuning.study import StudyResult, open_study, run_study, study_name
from tasks.common import flow_run_id
from tasks.tuning_events import TrialRuns


@task(name="start-study-run", cache_policy=NONE)
def start_study_run(
    *, spec: PipelineSpec, tune: TuneSpec, tracking_uri: str, artifact_root: str | None
) -> str:
    """The study's parent MLflow run (trials are nested under it)."""
    experiment = registry.ensure_experiment(
        tracking_uri=tracking_uri, name=spec.registry.experiment, artifact_root=artifact_root
    )
    name = study_name(spec=spec, tune=tune)
    return registry.start_run(
        tracking_uri=tracking_uri,
        experiment_id=experiment,
        run_name=f"tune-{name}",
        tags={"mms.study": name, "mms.prefect_flow_run_id": flow_run_id(), "mms.spec_hash": spec.hash},
        params={"tuning": tune.model_dump_json(), "spec": spec.model_dump_json(), "metric": tune.metric},
    )


@task(name="run-trials", cache_policy=NONE)
def run_trials(
    *,
    client: Client,
    spec: PipelineSpec,
    tune: TuneSpec,
    manifest_uri: str,
    root: str,
    storage_url: str,
    tracking_uri: str,
    parent_run_id: str,
) -> StudyResult:
    study = open_study(name=study_name(spec=spec, tune=tune), tune=tune, storage_url=storage_url)
    events = TrialRuns(
        tracking_uri=tracking_uri,
        experiment_id=registry.client(tracking_uri=tracking_uri).get_run(parent_run_id).info.experiment_id,
        parent_run_id=parent_run_id,
        study_name=study.study_name,
        trials=tune.trials,
        logger=get_run_logger(),
    )
    result = run_study(
        client=client,
        study=study,
        spec=spec,
        tune=tune,
        manifest_uri=manifest_uri,
        root=root,
        on_event=events,
    )
    for name, png in study_pngs(study).items():
        registry.log_artifact_bytes(tracking_uri=tracking_uri, run_id=parent_run_id, name=name, data=png)
    summary = {
        "completed_trials": result.completed,
        "pruned_trials": result.pruned,
        "failed_trials": result.failed,
    }
    if result.best_value is not None:
        summary[f"best_{tune.metric}"] = result.best_value
    registry.log_metrics(tracking_uri=tracking_uri, run_id=parent_run_id, metrics=summary)
    return result
