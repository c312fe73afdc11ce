"""MLflow: experiment set-up, run logging, model logging, idempotent registration, aliases.

All calls take the run id explicitly (no global "active run"), so tasks in any thread can log.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from mms_core.errors import ModelLoadError
from mms_core.packaging import PackageConfig, Predictor, read_package, write_package

PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")
TAG_VARIANT = "mms.variant"
TAG_ACCURACY = "mms.test_accuracy"


def client(*, tracking_uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(*, tracking_uri: str, name: str, artifact_root: str | None) -> str:
    """Return the experiment id, creating it (with artifacts under ``artifact_root``) if needed."""
    c = client(tracking_uri=tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = f"{artifact_root.rstrip('/')}/{name}" if artifact_root else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another run
        return c.get_experiment_by_name(name).experiment_id


def start_run(
    *, tracking_uri: str, experiment_id: str, run_name: str, tags: dict[str, str], params: dict[str, Any]
) -> str:
    c = client(tracking_uri=tracking_uri)
    run = c.create_run(experiment_id, run_name=run_name, tags=tags)
    for key, value in params.items():
        c.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id


def log_metrics(
    *, tracking_uri: str, run_id: str, metrics: dict[str, float], step: int | None = None
) -> None:
    c = client(tracking_uri=tracking_uri)
    for key, value in metrics.items():
        c.log_metric(run_id, key, float(value), step=step or 0)


def log_artifact_bytes(*, tracking_uri: str, run_id: str, name: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        client(tracking_uri=tracking_uri).log_artifact(run_id, str(path))


def end_run(*, tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri=tracking_uri).set_terminated(run_id, status=status)


def register_package(
    *,
    tracking_uri: str,
    run_id: str,
    name: str,
    config: PackageConfig,
    weights: bytes,
    example: pd.DataFrame,
    tags: dict[str, str],
) -> str:
    """Log the package as an MLflow pyfunc model of ``run_id`` and register it under ``name``.

    Idempotent: if ``run_id`` already has a version of ``name`` with the same variant tag, that
    version is returned and nothing new is logged. Returns the version number as a string.
    """
    c = client(tracking_uri=tracking_uri)
    existing = find_version(tracking_uri=tracking_uri, name=name, run_id=run_id, variant=tags[TAG_VARIANT])
    if existing is not None:
        return existing
    with tempfile.TemporaryDirectory() as tmp:
        package = write_package(directory=Path(tmp) / "package", config=config, weights=weights)
        predictions = Predictor.from_directory(package).predict(example)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=f"model-{tags[TAG_VARIANT]}",
                python_model=str(PYFUNC_CODE),
                artifacts={"package": str(package)},
                signature=infer_signature(example, predictions),
                input_example=example,
                # Requirement inference imports and profiles the model: slow, and we know them.
                pip_requirements=["torch", "safetensors", "pandas", "numpy", "mms"],
            )
    version = mlflow.register_model(info.model_uri, name, tags={**tags, "mms.run_id": run_id})
    c.update_model_version(name, version.version, description=f"{tags[TAG_VARIANT]} model from run {run_id}")
    return str(version.version)


def find_version(*, tracking_uri: str, name: str, run_id: str, variant: str) -> str | None:
    c = client(tracking_uri=tracking_uri)
    try:
        versions = c.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    for v in versions:
        if v.tags.get("mms.run_id") == run_id and v.tags.get(TAG_VARIANT) == variant:
            return str(v.version)
    return None


def champion_accuracy(*, tracking_uri: str, name: str, alias: str = "champion") -> float | None:
    """Test accuracy recorded on the version that holds ``alias``, or None if there is none."""
    try:
        v = client(tracking_uri=tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    value = v.tags.get(TAG_ACCURACY)
    return float(value) if value is not None else None


def set_alias(*, tracking_uri: str, name: str, alias: str, version: str) -> None:
    client(tracking_uri=tracking_uri).set_registered_model_alias(name, alias, version)


def alias_version(*, tracking_uri: str, name: str, alias: str) -> str | None:
    try:
        return str(client(tracking_uri=tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def run_tags(*, tracking_uri: str, run_id: str, prefix: str) -> dict[str, str]:
    """The run's tags whose names start with ``prefix`` (lineage: manifest/spec hash, commit, flow run)."""
    tags = client(tracking_uri=tracking_uri).get_run(run_id).data.tags
    return {k: v for k, v in tags.items() if k.startswith(prefix)}


def model_version(*, tracking_uri: str, model: str) -> ModelVersion:
    """The registered version named by ``NAME@ALIAS`` or ``NAME/VERSION``.

    Raises:
        ModelLoadError: the reference is malformed or names nothing registered.
    """
    name, sep, ref = model.removeprefix("models:/").partition("@")
    if not sep:
        name, _, ref = model.removeprefix("models:/").partition("/")
    if not name or not ref:
        raise ModelLoadError(
            f"model {model!r} must look like NAME@ALIAS or NAME/VERSION (e.g. digits-classifier@champion)"
        )
    c = client(tracking_uri=tracking_uri)
    try:
        return c.get_model_version_by_alias(name, ref) if sep else c.get_model_version(name, ref)
    except MlflowException as exc:
        raise ModelLoadError(f"no registered model {model!r} in {tracking_uri}: {exc.message}") from None


def load_package(*, tracking_uri: str, model: str) -> tuple[PackageConfig, bytes, str]:
    """Read a registered model's package by ``NAME@ALIAS`` or ``NAME/VERSION``.

    Returns (config, weights bytes, version). Raises ModelLoadError naming what was not found.
    """
    version = model_version(tracking_uri=tracking_uri, model=model)
    name = version.name
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version.version}", dst_path=tmp
            )
        )
        config, weights = read_package(local / "artifacts" / "package")  # where log_model puts `artifacts`
        return config, weights, str(version.version)
