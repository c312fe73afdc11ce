"""The MLflow side of retention: what the registry holds (versions, aliases, lineage tags, runs
still in progress) and deleting one model version together with its logged model's artifacts.

Kept apart from mms_core.retention, which decides; this module only reads and deletes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from mms_core import registry

TAG_MANIFEST = "mms.manifest_hash"
TAG_PARENT = "mms.parent_version"


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version, as retention needs it."""

    name: str
    version: str
    created_s: float
    run_id: str | None
    model_id: str | None
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass(frozen=True)
class RunningRun:
    """An MLflow run still marked RUNNING (a training in progress, or one that crashed)."""

    run_id: str
    started_s: float
    manifest_hash: str | None


def list_versions(*, tracking_uri: str) -> list[VersionInfo]:
    """Every version of every registered model, with its aliases (read from the registered model)."""
    c = registry.client(tracking_uri=tracking_uri)
    out: list[VersionInfo] = []
    for model in _pages(c.search_registered_models):
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for v in _pages(c.search_model_versions, filter_string=f"name='{model.name}'"):
            out.append(
                VersionInfo(
                    name=model.name,
                    version=str(v.version),
                    created_s=v.creation_timestamp / 1000,
                    run_id=v.run_id or v.tags.get("mms.run_id"),
                    model_id=_model_id(v),
                    aliases=tuple(sorted(aliases.get(str(v.version), []))),
                    tags=dict(v.tags),
                )
            )
    return out


def running_runs(*, tracking_uri: str) -> list[RunningRun]:
    """Runs in every experiment whose status is still RUNNING."""
    c = registry.client(tracking_uri=tracking_uri)
    ids = [e.experiment_id for e in _pages(c.search_experiments)]
    if not ids:
        return []
    runs = _pages(c.search_runs, experiment_ids=ids, filter_string="attributes.status = 'RUNNING'")
    return [
        RunningRun(
            run_id=r.info.run_id,
            started_s=r.info.start_time / 1000,
            manifest_hash=r.data.tags.get(TAG_MANIFEST),
        )
        for r in runs
    ]


def delete_version(
    *, tracking_uri: str, name: str, version: str, model_id: str | None, keep_model_ids: set[str]
) -> bool:
    """Delete ``name/version`` and, unless a surviving version shares it, its logged model's artifacts.

    Returns False when the version was already gone (a repeated or concurrent run), True otherwise.
    """
    c = registry.client(tracking_uri=tracking_uri)
    try:
        c.get_model_version(name, version)
    except MlflowException:
        return False
    c.delete_model_version(name, version)
    if model_id and model_id not in keep_model_ids:
        _delete_logged_model(c, model_id, tracking_uri=tracking_uri)
    return True


def _delete_logged_model(c: MlflowClient, model_id: str, *, tracking_uri: str) -> None:
    try:
        logged = c.get_logged_model(model_id)
    except MlflowException:
        return  # already deleted
    # MLflow's own delete only marks the record; the bytes are what retention is for.
    # tracking_uri resolves mlflow-artifacts:/ locations (a server's proxied store) to that server.
    get_artifact_repository(logged.artifact_location, tracking_uri=tracking_uri).delete_artifacts()
    c.delete_logged_model(model_id)


def _model_id(v) -> str | None:
    """The logged model behind a version: MLflow 3 records it as the source ``models:/<model_id>``
    (the ``model_id`` field stays empty on the sqlite registry)."""
    if getattr(v, "model_id", None):
        return v.model_id
    source = v.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def _pages(search, **kwargs) -> list:
    """All results of an MLflow search_* call, following page tokens."""
    out, token = [], None
    while True:
        page = search(**kwargs, page_token=token) if token else search(**kwargs)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out
