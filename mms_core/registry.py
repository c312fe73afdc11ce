"""MLflow: experiment set-up, run logging, model logging, idempotent registration, aliases.

All calls take the run id explicitly (no global "active run"), so tasks in any thread can log.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

import mms_portable
from mms_core.errors import ModelLoadError
from mms_core.models.zoo import builder_module, trusting
from mms_core.packaging import PackageConfig, Predictor, read_package, write_package
from mms_core.secrets import redact_text

PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")
# Logged beside the pyfunc (MLflow ``code_paths``): the networks and the predictor it loads.
PORTABLE_CODE = Path(mms_portable.__file__).parent
TAG_VARIANT = "mms.variant"
TAG_ACCURACY = "mms.test_accuracy"

# MLflow's own output, on the screen of every `mms` command that logs or loads a model. Defaults
# only (setdefault): a user who sets one of these variables wins. MLflow reads them at each call,
# and Dask workers started after this import inherit them.
# - a tqdm bar per artifact download; log_model downloads the model back to validate its input
#   example, so `mms run` drew several stray "Downloading artifacts" bars;
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# - "View run ... at: http://..." on stdout each time a run ends on an MLflow server (`mms stack
#   up`); the `mms run` summary already names the run and the UI.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# MLflow narrates routine steps at INFO on stderr ("Creating initial MLflow database tables...",
# "Validating input example against model signature"), which read like something to act on. Only
# these two loggers, and only below WARNING: MLflow's warnings and errors still show.
for _name in ("mlflow.store.db.utils", "mlflow.pyfunc"):
    logging.getLogger(_name).setLevel(logging.WARNING)

log = logging.getLogger(__name__)


def client(*, tracking_uri: str) -> MlflowClient:
    """A client whose runs and model registry are both at ``tracking_uri`` (MMS keeps them in one
    store). Named explicitly: else MLflow takes a registry URI set anywhere in the process
    (``MLFLOW_REGISTRY_URI``, ``mlflow.set_registry_uri``, an MLflow server started in it)."""
    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def open_store(*, tracking_uri: str) -> None:
    """Open the tracking store once: a new SQLite store runs MLflow's migrations (~2 s) here, so a
    caller can do it while waiting for something else instead of inside the first task."""
    client(tracking_uri=tracking_uri).search_experiments(max_results=1)


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
    """Create a run with ``tags`` and ``params``; a password in a URL of a param value is masked
    (secret fields are already masked in the specs' JSON form: mms_core.secrets)."""
    c = client(tracking_uri=tracking_uri)
    run = c.create_run(experiment_id, run_name=run_name, tags=tags)
    for key, value in params.items():
        c.log_param(run.info.run_id, key, redact_text(str(value))[:6000])
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

    The logged model carries its code (mms_portable, see :func:`model_requirements`), so a built-in
    network loads and serves with MLflow alone. A user model does not travel: it still needs MMS
    and its module where it loads, and registering one logs a warning saying so.

    For the training run that made ``config`` (its own model): the model's module is trusted while
    the package is checked and logged here, without MMS_TRUSTED_MODEL_MODULES; every later load
    (servers, workers, ``mlflow.pyfunc.load_model``) needs the operator's setting.
    """
    c = client(tracking_uri=tracking_uri)
    existing = find_version(tracking_uri=tracking_uri, name=name, run_id=run_id, variant=tags[TAG_VARIANT])
    if existing is not None:
        return existing
    # The run's own model (its spec named it, it just trained): trusted here whatever the operator
    # lists, as MLflow loads the pyfunc back below. Servers and workers still need the setting.
    own = builder_module(config.model.name)
    if own:
        _warn_user_model(name=name, model=config.model.name, module=own)
    with tempfile.TemporaryDirectory() as tmp, trusting(modules=[own] if own else []):
        package = write_package(directory=Path(tmp) / "package", config=config, weights=weights)
        predictions = Predictor.from_directory(package).predict(example)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=f"model-{tags[TAG_VARIANT]}",
                python_model=str(PYFUNC_CODE),
                code_paths=[str(PORTABLE_CODE)],
                artifacts={"package": str(package)},
                signature=infer_signature(example, predictions),
                input_example=example,
                # Requirement inference imports and profiles the model: slow, and we know them.
                pip_requirements=model_requirements(),
            )
    return _create_version(
        c,
        name=name,
        model=info,
        run_id=run_id,
        tags={**tags, "mms.run_id": run_id},
        description=f"{tags[TAG_VARIANT]} model from run {run_id}",
    )


def model_requirements() -> list[str]:
    """What a logged model needs installed: mlflow and mms_portable's dependencies, pinned.

    Published names only, each at the version installed here (the one the model was checked with).
    A local version label (torch's ``+cpu``) is dropped: the package index has no such file, and
    its ``torch==2.13.0`` is the same release (built for CUDA on Linux). Never ``mms``: no such
    package is published, so a restore could not install it, and whoever published one would have
    it installed by every restore.
    """
    dists = ("mlflow", *mms_portable.DEPENDENCIES)
    return [f"{dist}=={installed_version(dist).partition('+')[0]}" for dist in dists]


def _warn_user_model(*, name: str, model: str, module: str) -> None:
    log.warning(
        "registered model %r is the user model %r, not one of MMS's built-in networks: its versions load"
        " only where MMS and the module %r are installed, with %r listed in MMS_TRUSTED_MODEL_MODULES"
        " (mlflow.pyfunc.load_model and `mlflow models serve` elsewhere cannot rebuild it; its"
        " requirements name neither)",
        name,
        model,
        module,
        module,
    )


def _create_version(
    c: MlflowClient, *, name: str, model: ModelInfo, run_id: str, tags: dict[str, str], description: str
) -> str:
    """What ``mlflow.register_model`` does, through the client: the fluent call also prints
    "Successfully registered model ..." and "Created version ..." to stderr every time."""
    try:
        c.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # else: an earlier run created it
            raise
    version = c.create_model_version(
        name, model.model_uri, run_id=run_id, tags=tags, description=description, model_id=model.model_id
    )
    # The logged model's link to its version, shown on its page in MLflow's UI (register_model
    # sets it too). Each register_package call logs a new model, so this is its only version.
    c.set_logged_model_tags(
        model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([{"name": name, "version": version.version}])}
    )
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
    """The version ``alias`` points to; None when the model or the alias does not exist. Any other
    fault (an unreachable store) raises: "no alias" must never be a guess."""
    try:
        return str(client(tracking_uri=tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no model, no alias
            return None
        raise


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
