"""training-pipeline: ingest -> shard -> DDP training on Dask -> evaluate -> compress -> register."""

from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import BaseModel

from infra.cluster import dask_client_in_background
from mms_core import steps
from mms_core.config import Settings
from mms_core.evaluate import EvalResult
from mms_core.spec import PipelineSpec
from tasks import pipeline as t
from tasks.common import end_run, end_run_failed, flow_run_id


class PipelineResult(BaseModel):
    """What a run produced (the CLI prints it as the summary table)."""

    run_id: str
    flow_run_id: str
    experiment: str
    model_name: str
    registration: steps.RegisterResult
    evaluation: EvalResult
    compression: steps.CompressResult | None
    manifest_uri: str
    tracking_uri: str
    train_seconds: float
    samples_per_s: float


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(spec: PipelineSpec = PipelineSpec()) -> PipelineResult:  # noqa: B008 - Prefect form default
    """Train, evaluate, compress and register one model as described by ``spec``."""
    settings = Settings()
    tracking, root = settings.tracking_uri, settings.storage_root
    t.check_model(spec=spec.model)  # a bad model path fails here, before any work
    # The cluster starts while a built-in dataset is generated and sharded; a file source is
    # ingested and sharded on its workers.
    with dask_client_in_background(settings) as cluster:
        ingested = t.ingest(data=spec.data, root=root, cluster=cluster)
        manifest_uri = t.shard_with_cache(
            ingested=ingested, spec=spec.preprocess, root=root, cluster=cluster, data=spec.data
        )
        run_id = t.start_tracking(
            spec=spec, manifest_uri=manifest_uri, tracking_uri=tracking, artifact_root=settings.artifact_root
        )
        try:
            trained = t.train(
                cluster=cluster,
                spec=spec,
                manifest_uri=manifest_uri,
                run_id=run_id,
                tracking_uri=tracking,
                root=root,
            )
            cluster.close_soon()  # closes while evaluate, compress and register run
            common = dict(
                spec=spec,
                manifest_uri=manifest_uri,
                weights_uri=trained.weights_uri,
                run_id=run_id,
                tracking_uri=tracking,
            )
            evaluation = t.evaluate(**common)
            compressing = spec.compress.quantize or spec.compress.prune_amount
            compressed = t.compress(**common) if compressing else None
            registration = t.register(**common, evaluation=evaluation, compressed=compressed)
        except BaseException:
            end_run_failed(tracking_uri=tracking, run_id=run_id)
            raise
    end_run(tracking_uri=tracking, run_id=run_id)
    get_run_logger().info(
        "run %s done: %s v%s -> %s",
        run_id,
        spec.registry.model_name,
        registration.version,
        registration.alias,
    )
    return PipelineResult(
        run_id=run_id,
        flow_run_id=flow_run_id(),
        experiment=spec.registry.experiment,
        model_name=spec.registry.model_name,
        registration=registration,
        evaluation=evaluation,
        compression=compressed,
        manifest_uri=manifest_uri,
        tracking_uri=tracking,
        train_seconds=trained.train_seconds,
        samples_per_s=trained.samples / max(trained.train_seconds, 1e-9),
    )
