"""tuning: an Optuna study of short training runs on Dask, then the best configuration retrained
in full through the training pipeline (evaluate -> compress -> register gate)."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from flows.training_pipeline import PipelineResult, training_pipeline
from infra.cluster import dask_client_in_background
from mms_core.config import Settings
from mms_core.spec import PipelineSpec
from mms_core.tuning.space import TuneSpec, best_spec, check_space
from mms_core.tuning.study import StudyResult
from tasks import pipeline as tp
from tasks import tuning as t
from tasks.common import end_run, end_run_failed


class TuningResult(BaseModel):
    """The study's outcome and, unless tuning.retrain is off, the full run of its best trial."""

    study: StudyResult
    study_run_id: str
    tracking_uri: str
    best_spec: PipelineSpec | None
    retrained: PipelineResult | None


@flow(name="tuning", log_prints=True)
def tuning(
    spec: PipelineSpec = PipelineSpec(),  # noqa: B008 - Prefect form default
    tune: TuneSpec = TuneSpec(),  # noqa: B008
) -> TuningResult:
    """Search ``tune.params`` around ``spec``; retrain and register the best configuration."""
    check_space(spec=spec, tune=tune)  # an empty or inconsistent space fails before any work
    tp.check_model(spec=spec.model)
    settings = Settings()
    tracking, root = settings.tracking_uri, settings.storage_root
    with dask_client_in_background(settings) as cluster:
        ingested = tp.ingest(data=spec.data, root=root, cluster=cluster)
        manifest_uri = tp.shard_with_cache(
            ingested=ingested, spec=spec.preprocess, root=root, cluster=cluster, data=spec.data
        )
        run_id = t.start_study_run(
            spec=spec, tune=tune, tracking_uri=tracking, artifact_root=settings.artifact_root
        )
        try:
            study = t.run_trials(
                client=cluster.client(),
                spec=spec,
                tune=tune,
                manifest_uri=manifest_uri,
                root=root,
                storage_url=settings.study_storage,
                tracking_uri=tracking,
                parent_run_id=run_id,
            )
        except BaseException:
            end_run_failed(tracking_uri=tracking, run_id=run_id)
            raise
    end_run(tracking_uri=tracking, run_id=run_id)
    create_markdown_artifact(key="tuning", markdown=report(study), description=f"study {study.study_name}")
    best = best_spec(spec=spec, params=study.best_params) if study.best_number is not None else None
    retrained = None
    if best is None:
        get_run_logger().warning("no trial completed: nothing to retrain (see the trials' errors)")
    elif tune.retrain:
        get_run_logger().info("retraining trial %d's configuration in full", study.best_number)
        retrained = training_pipeline(spec=best)
    return TuningResult(
        study=study, study_run_id=run_id, tracking_uri=tracking, best_spec=best, retrained=retrained
    )


def report(study: StudyResult) -> str:
    """Markdown: the best trial, then every trial with its state, score and parameters."""
    names = sorted({k for tr in study.trials for k in tr.params})
    head = (
        f"## Study {study.study_name}: {study.completed} completed, {study.pruned} pruned, "
        f"{study.failed} failed\n\n"
    )
    if study.best_number is not None:
        head += f"Best: trial {study.best_number}, {study.metric} = {study.best_value:.4f}\n\n"
    rows = "\n".join(
        "| "
        + " | ".join(
            [str(tr.number), tr.state.lower(), "-" if tr.value is None else f"{tr.value:.4f}", str(tr.epochs)]
            + [f"`{tr.params.get(n)}`" for n in names]
        )
        + " |"
        for tr in study.trials
    )
    cols = " | ".join(["trial", "state", study.metric, "epochs", *names])
    return head + f"| {cols} |\n|{'---|' * (4 + len(names))}\n{rows}\n"
