"""The training-pipeline flow on real components: Prefect harness, Dask LocalCluster, MLflow sqlite."""

import pandas as pd
import pytest
from mlflow import MlflowClient

from flows.training_pipeline import training_pipeline
from mms_core.data.shard import load_manifest
from mms_core.errors import DataError, ModelLoadError, TrainingError
from mms_core.spec import load_spec

FAST = ["training.epochs=4", "evaluate.min_accuracy=0.5", "registry.experiment=test-flows"]


def _registry(home):
    return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")


def _versions(home, name="digits-classifier"):
    try:
        return _registry(home).search_model_versions(f"name='{name}'")
    except Exception:  # no database or no such model yet
        return []


def _task_states(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


@pytest.mark.slow
def test_pipeline_registers_champion_with_lineage_then_reuses_shards(mms_home):
    spec = load_spec("examples/digits.yaml", overrides=FAST)
    first = training_pipeline(spec=spec)

    client = _registry(mms_home)
    assert first.registration.alias == "champion"
    champion = client.get_model_version_by_alias("digits-classifier", "champion")
    assert str(champion.version) == first.registration.version == "1"
    tags = champion.tags
    assert tags["mms.manifest_hash"] == load_manifest(first.manifest_uri).hash
    assert tags["mms.spec_hash"] == spec.hash
    assert tags["mms.prefect_flow_run_id"] == first.flow_run_id
    assert tags["mms.variant"] == "fp32" and tags["mms.git_commit"]
    assert float(tags["mms.test_accuracy"]) == pytest.approx(first.evaluation.accuracy)
    int8 = client.get_model_version("digits-classifier", first.registration.compressed_version)
    assert int8.tags["mms.variant"] == "int8" and int8.tags["mms.parent_version"] == "1"

    history = client.get_metric_history(first.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert history[-1].value < history[0].value
    assert client.get_run(first.run_id).data.metrics["test_accuracy"] == pytest.approx(
        first.evaluation.accuracy
    )
    assert {"confusion_matrix.png", "training_curves.png"} <= {
        a.path for a in client.list_artifacts(first.run_id)
    }
    assert client.get_run(first.run_id).info.status == "FINISHED"
    states = _task_states(first.flow_run_id)  # side effects are task runs, the run's end included
    assert states["check-model"] == states["end-run"] == states["register"] == "Completed"

    # Same data + shard config: the shard task is served from Prefect's cache, same manifest.
    # A run that misses the minimum is registered as the candidate; the champion stays.
    second = training_pipeline(
        spec=load_spec("examples/digits.yaml", overrides=[*FAST, "evaluate.min_accuracy=1.0"])
    )
    assert second.manifest_uri == first.manifest_uri
    assert _task_states(second.flow_run_id)["preprocess-and-shard"] == "Cached"
    assert _task_states(first.flow_run_id)["preprocess-and-shard"] == "Completed"
    assert second.registration.alias == "candidate" and "minimum" in second.registration.reason
    # Same data, model and training settings: the re-run finds the first run's checkpoints and
    # resumes from the last one (nothing left to train), with the same weights and history.
    assert [m.value for m in client.get_metric_history(second.run_id, "train_loss")] == [
        m.value for m in history
    ]
    weights = [
        (mms_home / "data" / "models" / r.run_id / "model.safetensors").read_bytes() for r in (first, second)
    ]
    assert weights[0] == weights[1]
    assert str(client.get_model_version_by_alias("digits-classifier", "champion").version) == "1"
    assert (
        str(client.get_model_version_by_alias("digits-classifier", "candidate").version)
        == second.registration.version
    )


def test_missing_label_column_fails_before_training_and_registers_nothing(mms_home):
    csv = mms_home / "no_label.csv"
    pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [0.1, 0.2, 0.3]}).to_csv(csv, index=False)
    spec = load_spec(overrides=[f"data.source={csv}", "data.label=target"])
    with pytest.raises(DataError, match=r"label column 'target' not found.*set data.label"):
        training_pipeline(spec=spec)
    assert _versions(mms_home) == []


def test_unknown_model_path_fails_fast_and_registers_nothing(mms_home):
    spec = load_spec(overrides=["model.name=no_such_pkg.models:build"])
    with pytest.raises(ModelLoadError, match=r"cannot import module 'no_such_pkg.models'.*PYTHONPATH"):
        training_pipeline(spec=spec)
    assert _versions(mms_home) == []


@pytest.mark.slow
def test_corrupt_shard_fails_the_run_naming_the_shard_and_registers_nothing(mms_home):
    from mms_core import steps
    from mms_core.config import Settings
    from mms_core.data.shard import preprocess_and_shard

    spec = load_spec("examples/digits.yaml", overrides=FAST)
    root = Settings().storage_root
    ingested = steps.ingest(spec=spec.data, root=root)
    manifest_uri = preprocess_and_shard(
        raw_uri=ingested.uri, source_sha256=ingested.sha256, label="label", spec=spec.preprocess, root=root
    )
    bad = load_manifest(manifest_uri).train[1].uri
    with open(bad, "r+b") as f:  # flip bytes in the middle of the file
        f.seek(200)
        f.write(b"\x00garbage\x00")

    with pytest.raises(TrainingError, match=r"shard .*train-00001\.parquet is corrupt"):
        training_pipeline(spec=spec)
    assert _versions(mms_home) == []
    runs = _registry(mms_home).search_runs(
        [_registry(mms_home).get_experiment_by_name("test-flows").experiment_id]
    )
    assert [r.info.status for r in runs] == ["FAILED"]
    states = _task_states(runs[0].data.tags["mms.prefect_flow_run_id"])
    assert states["train"] == "Failed" and states["end-run"] == "Completed"  # the FAILED end, a task


def test_shard_cache_rebuilds_when_cached_shards_were_deleted(mms_home):
    import shutil

    from prefect import flow

    from mms_core.config import Settings
    from mms_core.data.ingest import DataSpec
    from mms_core.data.shard import ShardSpec
    from tasks.pipeline import ingest, shard_with_cache

    @flow
    def shard_only() -> str:
        # a built-in dataset: ingested and sharded in the flow process, no cluster needed
        ingested = ingest(data=DataSpec(), root=Settings().storage_root, cluster=None)
        return shard_with_cache(
            ingested=ingested,
            spec=ShardSpec(seed=7),
            root=Settings().storage_root,
            cluster=None,
            data=DataSpec(),
        )

    uri = shard_only()
    assert shard_only() == uri  # served from the cache
    shutil.rmtree(load_manifest(uri).val.uri.rsplit("/", 1)[0])
    assert shard_only() == uri  # the cached URI pointed at nothing: rebuilt in place
    load_manifest(uri)  # readable again


@pytest.mark.slow
def test_fedavg_strategy_runs_through_the_same_flow_and_registers(mms_home):
    spec = load_spec("examples/digits-fedavg.yaml", overrides=["training.fedavg.rounds=12", *FAST[1:]])
    result = training_pipeline(spec=spec)
    versions = _versions(mms_home)
    assert versions, "no model version registered"
    run = _registry(mms_home).get_run(result.run_id)
    assert run.data.params["strategy"] == "fedavg"
    assert len(_registry(mms_home).get_metric_history(result.run_id, "val_accuracy")) == 12  # one per round
    assert run.data.metrics["test_accuracy"] >= 0.85


@pytest.mark.slow
def test_param_server_strategy_runs_through_the_same_flow_and_logs_staleness(mms_home):
    spec = load_spec("examples/digits-param-server.yaml", overrides=FAST)
    result = training_pipeline(spec=spec)
    client = _registry(mms_home)
    run = client.get_run(result.run_id)
    assert run.data.params["strategy"] == "param_server"
    assert len(client.get_metric_history(result.run_id, "val_accuracy")) == 4
    staleness = client.get_metric_history(result.run_id, "staleness_max")
    assert [m.step for m in staleness] == [1, 2, 3, 4]
    assert all(0 <= m.value <= 2 for m in staleness)  # staleness_bound: 2
    assert "strategy_stats.json" in {a.path for a in client.list_artifacts(result.run_id)}
    assert run.data.metrics["test_accuracy"] >= 0.85
    assert _versions(mms_home)
