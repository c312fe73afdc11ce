"""Tasks of the training-pipeline flow, in pipeline order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mms_core import registry, steps, storage
from mms_core.data.ingest import DataSpec, IngestResult, is_builtin
from mms_core.data.shard import ShardSpec, load_manifest
from mms_core.evaluate import EvalResult
from mms_core.models import ModelSpec
from mms_core.plots import confusion_png, training_curves_png
from mms_core.secrets import redact_url
from mms_core.spec import PipelineSpec
from mms_core.training.spec import RankResult, TrainJob, checkpoint_key
from mms_core.training.strategies import progress_units, run_strategy
from tasks.common import flow_run_id, git_commit, transient
from tasks.training_events import TrainingEvents

if TYPE_CHECKING:  # the flow owns the cluster; this task only waits for its client
    from infra.cluster import ClusterInBackground


# No retries: every failure is a ModelLoadError (a bad name or import path), never transient.
@task(name="check-model", cache_policy=NONE)
def check_model(*, spec: ModelSpec) -> None:
    """Resolve the model's builder (importing a user's module) before any work is done."""
    steps.check_model(spec=spec)
    get_run_logger().info("model %s resolves", spec.name)


@task(name="ingest", retries=2, retry_delay_seconds=2, retry_condition_fn=transient, cache_policy=NONE)
def ingest(*, data: DataSpec, root: str, cluster: ClusterInBackground | None) -> IngestResult:
    # A built-in dataset is generated here while the cluster starts (None: built-in data only);
    # files are read on its workers.
    client = None if is_builtin(data.source) or cluster is None else cluster.client()
    result = steps.ingest(spec=data, root=root, client=client)
    get_run_logger().info(
        "ingested %s: %d rows, %d features -> %s",
        redact_url(data.source),
        result.rows,
        len(result.features),
        result.uri,
    )
    return result


def _shard_cache_key(context: Any, params: dict[str, Any]) -> str:
    """Content address of the shards: same input bytes + same config (+ same root) -> same key."""
    key = steps.shard_key_of(ingested=params["ingested"], spec=params["spec"])
    return f"shards-{key}-{storage.canonical_hash(params['root'])[:8]}"


@task(
    name="preprocess-and-shard",
    cache_key_fn=_shard_cache_key,
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=transient,
)
def shard(
    *, ingested: IngestResult, spec: ShardSpec, root: str, cluster: ClusterInBackground | None, data: DataSpec
) -> str:
    client = None if ingested.layout == "snapshot" or cluster is None else cluster.client()
    uri = steps.shard(ingested=ingested, spec=spec, root=root, client=client, data=data)
    get_run_logger().info("shards ready: %s", uri)
    return uri


def shard_with_cache(
    *, ingested: IngestResult, spec: ShardSpec, root: str, cluster: ClusterInBackground | None, data: DataSpec
) -> str:
    """Shard, served from Prefect's cache when the same data and config were sharded before;
    if the cached manifest has since been deleted (retention, a user), rebuild it."""
    args = dict(ingested=ingested, spec=spec, root=root, cluster=cluster, data=data)
    uri = shard(**args)
    if not storage.exists(uri):
        uri = shard.with_options(refresh_cache=True)(**args)
    return uri


@task(name="start-tracking", cache_policy=NONE)
def start_tracking(
    *, spec: PipelineSpec, manifest_uri: str, tracking_uri: str, artifact_root: str | None
) -> str:
    experiment = registry.ensure_experiment(
        tracking_uri=tracking_uri, name=spec.registry.experiment, artifact_root=artifact_root
    )
    tags = {
        "mms.manifest_hash": load_manifest(manifest_uri).hash,
        "mms.spec_hash": spec.hash,
        "mms.git_commit": git_commit(),
        "mms.prefect_flow_run_id": flow_run_id(),
    }
    params = {
        "spec": spec.model_dump_json(),  # secrets masked (DataSpec's JSON form)
        "model": spec.model.name,
        "strategy": spec.training.strategy,
        "epochs": spec.training.epochs,
        "batch_size": spec.training.batch_size,
        "lr": spec.training.lr,
    }
    return registry.start_run(
        tracking_uri=tracking_uri, experiment_id=experiment, run_name=spec.name, tags=tags, params=params
    )


@task(name="train", cache_policy=NONE)
def train(
    *,
    cluster: ClusterInBackground,
    spec: PipelineSpec,
    manifest_uri: str,
    run_id: str,
    tracking_uri: str,
    root: str,
) -> RankResult:
    client = cluster.client()  # started with the flow; waits here if it is still warming up
    job = TrainJob(
        manifest_uri=manifest_uri,
        model=spec.model,
        train=spec.training,
        output_uri=storage.join(root, "models", run_id, "model.safetensors"),
        checkpoint_uri=storage.join(
            root,
            "checkpoints",
            checkpoint_key(
                manifest_hash=load_manifest(manifest_uri).hash, model=spec.model, train=spec.training
            ),
        ),
    )
    events = TrainingEvents(tracking_uri=tracking_uri, run_id=run_id, logger=get_run_logger())
    rank0 = run_strategy(client=client, job=job, on_event=events)[0]
    events.finish(rank0, epochs=progress_units(spec.training))
    png = training_curves_png(
        history=rank0.history, title=f"{spec.name}: {spec.model.name}, {spec.training.strategy}"
    )
    registry.log_artifact_bytes(
        tracking_uri=tracking_uri, run_id=run_id, name="training_curves.png", data=png
    )
    return rank0


@task(name="evaluate", cache_policy=NONE)
def evaluate(
    *, spec: PipelineSpec, manifest_uri: str, weights_uri: str, run_id: str, tracking_uri: str
) -> EvalResult:
    result = steps.evaluate_trained(manifest_uri=manifest_uri, model=spec.model, weights_uri=weights_uri)
    metrics = {"test_accuracy": result.accuracy, "test_macro_f1": result.macro_f1}
    if result.perplexity is not None:  # a language model: per-token loss instead of a confusion matrix
        metrics |= {"test_loss": result.loss, "test_perplexity": result.perplexity}
    registry.log_metrics(tracking_uri=tracking_uri, run_id=run_id, metrics=metrics)
    if result.confusion:
        labels = [str(c) for c in load_manifest(manifest_uri).classes]
        png = confusion_png(
            confusion=result.confusion, labels=labels, title=f"{spec.name}: test confusion matrix"
        )
        registry.log_artifact_bytes(
            tracking_uri=tracking_uri, run_id=run_id, name="confusion_matrix.png", data=png
        )
    lm = "" if result.perplexity is None else f", perplexity {result.perplexity:.3f} ({result.tokens} tokens)"
    get_run_logger().info("test accuracy %.4f, macro-F1 %.4f%s", result.accuracy, result.macro_f1, lm)
    return result


@task(name="compress", cache_policy=NONE)
def compress(
    *, spec: PipelineSpec, manifest_uri: str, weights_uri: str, run_id: str, tracking_uri: str
) -> steps.CompressResult:
    result = steps.compress_trained(
        manifest_uri=manifest_uri, model=spec.model, weights_uri=weights_uri, spec=spec.compress
    )
    metrics = result.model_dump(exclude={"weights_uri", "within_budget"})
    registry.log_metrics(
        tracking_uri=tracking_uri, run_id=run_id, metrics={f"compress_{k}": v for k, v in metrics.items()}
    )
    get_run_logger().info(
        "compressed %d -> %d bytes (%.1fx), accuracy %.4f -> %.4f",
        result.full_bytes,
        result.compressed_bytes,
        result.size_ratio,
        result.full_accuracy,
        result.compressed_accuracy,
    )
    return result


@task(name="register", cache_policy=NONE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient)
def register(
    *,
    spec: PipelineSpec,
    manifest_uri: str,
    weights_uri: str,
    run_id: str,
    tracking_uri: str,
    evaluation: EvalResult,
    compressed: steps.CompressResult | None,
) -> steps.RegisterResult:
    lineage = registry.run_tags(tracking_uri=tracking_uri, run_id=run_id, prefix="mms.")
    result = steps.register_trained(
        tracking_uri=tracking_uri,
        run_id=run_id,
        spec=spec,
        manifest_uri=manifest_uri,
        weights_uri=weights_uri,
        evaluation=evaluation,
        compressed=compressed,
        lineage=lineage,
    )
    get_run_logger().info(
        "registered %s version %s as %s (%s)",
        spec.registry.model_name,
        result.version,
        result.alias,
        result.reason,
    )
    return result
