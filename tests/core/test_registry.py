"""MLflow registry on a real sqlite store in tmp_path: experiments, runs, idempotent registration,
gate-driven aliases, the int8 sibling, and loading the registered pyfunc (models from code)."""

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from mms_core import registry, steps, storage
from mms_core.compress import CompressSpec
from mms_core.data.ingest import DataSpec
from mms_core.data.shard import ShardSpec, load_manifest, preprocess_and_shard, read_shard
from mms_core.evaluate import EvalSpec
from mms_core.models import ModelSpec, build_model
from mms_core.packaging import PackageConfig, Predictor, write_package
from mms_core.spec import PipelineSpec, RegisterSpec
from mms_core.training.checkpoint import state_bytes
from mms_core.training.loop import train_rank
from mms_core.training.spec import TrainJob, TrainSpec

NAME = "test-digits"
MLP = ModelSpec(name="mlp")


@pytest.fixture(scope="module")
def store(tmp_path_factory, global_tracking_uri):
    """A fresh MLflow sqlite store; the global tracking URI is put back afterwards."""
    root = tmp_path_factory.mktemp("mlflow")
    with global_tracking_uri(f"sqlite:///{root}/mlflow.db") as uri:
        yield {"uri": uri, "artifacts": root.as_uri() + "/artifacts", "root": root}


@pytest.fixture(autouse=True)
def _global_uri(store):
    """models:/ URIs resolve through the global tracking URI: point it at this store."""
    mlflow.set_tracking_uri(store["uri"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("registry-data"))
    raw = steps.ingest(spec=DataSpec(source="builtin://digits"), root=root)
    manifest_uri = preprocess_and_shard(
        raw_uri=raw.uri, source_sha256=raw.sha256, label="label", spec=ShardSpec(n_shards=2), root=root
    )
    job = TrainJob(
        manifest_uri=manifest_uri,
        model=MLP,
        train=TrainSpec(epochs=3, checkpoint_every=0),
        output_uri=f"{root}/models/good/model.safetensors",
        checkpoint_uri=f"{root}/ckpt",
    )
    trained = train_rank(job=job, rank=0, world_size=1).weights_uri
    torch.manual_seed(0)
    untrained = f"{root}/models/init/model.safetensors"
    storage.write_bytes_atomic(untrained, state_bytes(build_model(spec=MLP, in_features=64, n_classes=10)))
    return {
        "root": root,
        "manifest_uri": manifest_uri,
        "raw_uri": raw.uri,
        "trained": trained,
        "init": untrained,
    }


def _spec() -> PipelineSpec:
    return PipelineSpec(
        model=MLP,
        evaluate=EvalSpec(min_accuracy=0.8),
        registry=RegisterSpec(model_name=NAME, experiment="test-registry"),
    )


def _raw_rows(data, n: int = 300) -> tuple[pd.DataFrame, np.ndarray]:
    """Unscaled feature rows straight from the ingested snapshot (not from the shards)."""
    df = pd.read_parquet(data["raw_uri"]).sample(n=n, random_state=0)
    y = df.pop("label").to_numpy()
    return df.astype(np.float32), y


@pytest.fixture(scope="module")
def flow(store, data):
    """The registry side of two pipeline runs: a good model, then a worse one."""
    uri, spec = store["uri"], _spec()
    manifest = load_manifest(data["manifest_uri"])
    exp = registry.ensure_experiment(
        tracking_uri=uri, name=spec.registry.experiment, artifact_root=store["artifacts"]
    )
    lineage = {"mms.manifest_hash": manifest.hash, "mms.spec_hash": spec.hash, "mms.git_commit": "0123abc"}
    c = MlflowClient(tracking_uri=uri)

    run1 = registry.start_run(tracking_uri=uri, experiment_id=exp, run_name="good", tags=lineage, params={})
    ev1 = steps.evaluate_trained(manifest_uri=data["manifest_uri"], model=MLP, weights_uri=data["trained"])
    comp1 = steps.compress_trained(
        manifest_uri=data["manifest_uri"], model=MLP, weights_uri=data["trained"], spec=CompressSpec()
    )
    kw = dict(tracking_uri=uri, spec=spec, manifest_uri=data["manifest_uri"], lineage=lineage)
    first = steps.register_trained(
        run_id=run1, weights_uri=data["trained"], evaluation=ev1, compressed=comp1, **kw
    )
    n_after_first = len(c.search_model_versions(f"name='{NAME}'"))
    again = steps.register_trained(
        run_id=run1, weights_uri=data["trained"], evaluation=ev1, compressed=comp1, **kw
    )
    n_after_again = len(c.search_model_versions(f"name='{NAME}'"))

    run2 = registry.start_run(tracking_uri=uri, experiment_id=exp, run_name="worse", tags=lineage, params={})
    ev2 = steps.evaluate_trained(manifest_uri=data["manifest_uri"], model=MLP, weights_uri=data["init"])
    second = steps.register_trained(
        run_id=run2, weights_uri=data["init"], evaluation=ev2, compressed=None, **kw
    )
    return {
        "uri": uri,
        "exp": exp,
        "artifacts": store["artifacts"],
        "client": c,
        "run1": run1,
        "run2": run2,
        "ev1": ev1,
        "ev2": ev2,
        "comp1": comp1,
        "first": first,
        "again": again,
        "second": second,
        "counts": (n_after_first, n_after_again),
        "lineage": lineage,
    }


# -- experiments and runs -------------------------------------------------------------------------


def test_ensure_experiment_is_idempotent_and_uses_the_artifact_root(store):
    uri = store["uri"]
    a = registry.ensure_experiment(tracking_uri=uri, name="exp-a", artifact_root=store["artifacts"] + "/")
    b = registry.ensure_experiment(tracking_uri=uri, name="exp-a", artifact_root=store["artifacts"])
    other = registry.ensure_experiment(tracking_uri=uri, name="exp-b", artifact_root=store["artifacts"])
    assert a == b != other
    c = MlflowClient(tracking_uri=uri)
    assert c.get_experiment(a).artifact_location == store["artifacts"] + "/exp-a"
    assert c.get_experiment(other).artifact_location == store["artifacts"] + "/exp-b"
    assert [e.experiment_id for e in c.search_experiments(filter_string="name = 'exp-a'")] == [a]
    assert mlflow.get_tracking_uri() == uri  # registry.client points the global API at the store


def test_start_run_logs_params_tags_and_metrics(store):
    uri = store["uri"]
    exp = registry.ensure_experiment(tracking_uri=uri, name="exp-runs", artifact_root=store["artifacts"])
    run_id = registry.start_run(
        tracking_uri=uri,
        experiment_id=exp,
        run_name="r1",
        tags={"mms.spec_hash": "abc", "mms.commit": "deadbeef", "other": "x"},
        params={"epochs": 3, "lr": 0.002, "long": "y" * 7000},
    )
    registry.log_metrics(tracking_uri=uri, run_id=run_id, metrics={"loss": 1.5, "acc": 0.25}, step=1)
    registry.log_metrics(tracking_uri=uri, run_id=run_id, metrics={"loss": 0.5, "acc": 0.75}, step=2)
    registry.log_metrics(tracking_uri=uri, run_id=run_id, metrics={"test_accuracy": 0.9})
    registry.log_artifact_bytes(tracking_uri=uri, run_id=run_id, name="blob.bin", data=b"\x00\x01mms")
    registry.end_run(tracking_uri=uri, run_id=run_id)

    c = MlflowClient(tracking_uri=uri)
    run = c.get_run(run_id)
    assert run.info.experiment_id == exp and run.info.run_name == "r1"
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "3" and run.data.params["lr"] == "0.002"
    assert len(run.data.params["long"]) == 6000
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "loss")] == [(1, 1.5), (2, 0.5)]
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "acc")] == [(1, 0.25), (2, 0.75)]
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "test_accuracy")] == [(0, 0.9)]
    assert registry.run_tags(tracking_uri=uri, run_id=run_id, prefix="mms.") == {
        "mms.spec_hash": "abc",
        "mms.commit": "deadbeef",
    }
    assert run.info.artifact_uri.startswith(store["artifacts"] + "/exp-runs")
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="blob.bin", tracking_uri=uri)
    assert Path(local).read_bytes() == b"\x00\x01mms"


# -- registration ---------------------------------------------------------------------------------


def test_first_registration_is_version_1_with_tags_and_champion_alias(flow, data):
    c, first, ev1 = flow["client"], flow["first"], flow["ev1"]
    assert ev1.accuracy > 0.8
    assert first.version == "1"
    assert first.alias == "champion"
    assert "no champion yet" in first.reason
    v1 = c.get_model_version(NAME, "1")
    assert v1.run_id == flow["run1"]
    assert v1.tags["mms.variant"] == "fp32"
    assert v1.tags["mms.test_accuracy"] == f"{ev1.accuracy:.6f}"
    assert v1.tags["mms.run_id"] == flow["run1"]
    assert v1.tags["mms.gate"] == first.reason
    for k, v in flow["lineage"].items():
        assert v1.tags[k] == v
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "1"
    champion = registry.champion_accuracy(tracking_uri=flow["uri"], name=NAME)
    assert champion == pytest.approx(ev1.accuracy, abs=1e-6)


def test_int8_sibling_is_registered_with_parent_version(flow):
    c, first, comp1 = flow["client"], flow["first"], flow["comp1"]
    assert first.compressed_version == "2"
    v2 = c.get_model_version(NAME, first.compressed_version)
    assert v2.run_id == flow["run1"]
    assert v2.tags["mms.variant"] == "int8"
    assert v2.tags["mms.parent_version"] == first.version
    assert v2.tags["mms.test_accuracy"] == f"{comp1.compressed_accuracy:.6f}"
    assert v2.tags["mms.manifest_hash"] == flow["lineage"]["mms.manifest_hash"]
    assert "int8" in v2.description and flow["run1"] in v2.description


def test_registering_the_same_run_again_creates_no_new_version(flow):
    first, again = flow["first"], flow["again"]
    assert flow["counts"] == (2, 2)
    assert again.version == first.version == "1"
    assert again.compressed_version == first.compressed_version
    assert again.alias == "champion"
    # the model was logged once per variant, not again
    logged = mlflow.search_logged_models(experiment_ids=[flow["exp"]], output_format="list")
    assert sorted(m.name for m in logged if m.source_run_id == flow["run1"]) == ["model-fp32", "model-int8"]
    # and stored under the experiment's artifact root in tmp_path
    assert all(m.artifact_location.startswith(flow["artifacts"] + "/test-registry/") for m in logged)
    assert str(flow["client"].get_model_version_by_alias(NAME, "champion").version) == "1"


def test_worse_second_run_becomes_candidate_and_champion_stays(flow):
    c, second, ev2 = flow["client"], flow["second"], flow["ev2"]
    assert ev2.accuracy < flow["ev1"].accuracy
    assert second.alias == "candidate"
    assert second.version == "3"
    assert second.compressed_version is None
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(c.get_model_version_by_alias(NAME, "candidate").version) == "3"
    v3 = c.get_model_version(NAME, "3")
    assert v3.run_id == flow["run2"]
    assert v3.tags["mms.test_accuracy"] == f"{ev2.accuracy:.6f}"
    assert len(c.search_model_versions(f"name='{NAME}'")) == 3


def test_champion_loads_as_pyfunc_from_code_and_matches_predictor(flow, data, tmp_path):
    df, y = _raw_rows(data)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    pred = np.asarray(model.predict(df))

    manifest = load_manifest(data["manifest_uri"])
    pkg = write_package(
        directory=tmp_path / "pkg",
        config=PackageConfig.from_manifest(manifest, model=MLP, format="fp32"),
        weights=Path(data["trained"]).read_bytes(),
    )
    expected = Predictor.from_directory(pkg).predict(df)
    assert pred.tolist() == expected.tolist()
    assert (pred == y).mean() > 0.85

    # models from code: the stored model carries the code file, no pickled python model
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"))
    files = [p.name for p in local.rglob("*") if p.is_file()]
    assert "mms_model.json" in files and "weights.safetensors" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    assert "mlflow_model.py" in files
    mlmodel = (local / "MLmodel").read_text()
    assert "python_function" in mlmodel


def test_int8_version_loads_and_agrees_with_fp32(flow, data):
    df, y = _raw_rows(data)
    fp32 = np.asarray(mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(df))
    int8 = np.asarray(
        mlflow.pyfunc.load_model(f"models:/{NAME}/{flow['first'].compressed_version}").predict(df)
    )
    assert (fp32 == int8).mean() > 0.95
    assert (int8 == y).mean() > 0.85


def test_registered_model_rejects_missing_columns(flow, data):
    df, _ = _raw_rows(data, n=5)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    with pytest.raises(Exception, match="pixel_3"):
        model.predict(df.drop(columns=["pixel_3"]))


def test_register_package_is_idempotent_per_variant(store, data, tmp_path):
    uri = store["uri"]
    name = "test-idem"
    exp = registry.ensure_experiment(tracking_uri=uri, name="exp-idem", artifact_root=store["artifacts"])
    run_id = registry.start_run(tracking_uri=uri, experiment_id=exp, run_name="idem", tags={}, params={})
    manifest = load_manifest(data["manifest_uri"])
    x, _ = read_shard(manifest.test)
    example = pd.DataFrame(x[:3] * manifest.std + manifest.mean, columns=manifest.features).astype(np.float32)
    args = dict(
        tracking_uri=uri,
        run_id=run_id,
        name=name,
        config=PackageConfig.from_manifest(manifest, model=MLP, format="fp32"),
        weights=Path(data["init"]).read_bytes(),
        example=example,
    )
    assert registry.find_version(tracking_uri=uri, name=name, run_id=run_id, variant="fp32") is None
    v = registry.register_package(**args, tags={registry.TAG_VARIANT: "fp32"})
    assert registry.register_package(**args, tags={registry.TAG_VARIANT: "fp32"}) == v == "1"
    assert registry.find_version(tracking_uri=uri, name=name, run_id=run_id, variant="fp32") == "1"
    assert registry.find_version(tracking_uri=uri, name=name, run_id=run_id, variant="int8") is None
    assert registry.alias_version(tracking_uri=uri, name=name, alias="champion") is None
    assert registry.champion_accuracy(tracking_uri=uri, name=name) is None  # no alias, no tag
    registry.set_alias(tracking_uri=uri, name=name, alias="champion", version=v)
    assert registry.alias_version(tracking_uri=uri, name=name, alias="champion") == "1"
    assert registry.champion_accuracy(tracking_uri=uri, name=name) is None  # alias but no accuracy tag
    assert len(MlflowClient(tracking_uri=uri).search_model_versions(f"name='{name}'")) == 1
    assert mlflow.active_run() is None


def test_registry_calls_go_to_the_tracking_uri_whatever_registry_uri_the_process_has(
    store, tmp_path, monkeypatch
):
    """A registry URI set elsewhere in the process (here: the variable; an MLflow server started in
    the process sets the global) must not divert MMS's registry calls from its one store."""
    uri = store["uri"]
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'other.db'}")
    registry.client(tracking_uri=uri).create_registered_model("routed")
    assert MlflowClient(tracking_uri=uri, registry_uri=uri).get_registered_model("routed").name == "routed"
    assert registry.alias_version(tracking_uri=uri, name="routed", alias="champion") is None
    assert not (tmp_path / "other.db").exists()
