"""Retention: delete old shards, checkpoints, model weights and registered model versions.

Never deleted: a version holding an alias, one a running server leases (serving/lease.py), the
newest ``keep_last_versions`` of each registered model, the int8/fp32 sibling of a kept version,
and the data a kept version or a training in progress refers to (its shards by manifest hash,
its run's weights). ``plan_retention`` decides and lists; ``apply_retention`` deletes what the
plan lists, idempotently: a second run finds nothing more to delete.

Storage items are whole directories one level below ``<storage_root>/{shards,checkpoints,models}``;
their age is that of their newest file, so a directory still being written is young.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mms_core import storage
from mms_core.data.shard import load_manifest
from mms_core.errors import MMSError, RetentionError
from mms_core.retention_registry import (
    TAG_MANIFEST,
    TAG_PARENT,
    VersionInfo,
    delete_version,
    list_versions,
    running_runs,
)
from mms_core.serving.lease import active_leases

Kind = Literal["shards", "checkpoints", "model_weights", "model_versions"]
KINDS: tuple[Kind, ...] = ("shards", "checkpoints", "model_weights", "model_versions")
DIRS: dict[str, str] = {"shards": "shards", "checkpoints": "checkpoints", "model_weights": "models"}
DAY_S = 86_400.0
_VERSION_REF = re.compile(r"^[^/@\s]+/\d+$")
log = logging.getLogger(__name__)


class RetentionPolicy(BaseSettings):
    """What retention may delete (env prefix MMS_RETENTION_; the CLI and flow parameters override)."""

    model_config = SettingsConfigDict(env_prefix="MMS_RETENTION_", frozen=True)

    max_age_days: float = Field(default=30.0, gt=0, description="Items older than this many days go.")
    keep_last_versions: int = Field(
        default=5,
        ge=1,
        description="Newest versions of each registered model always kept, whatever their age.",
    )
    kinds: tuple[Kind, ...] = Field(
        default=KINDS, description="What to consider: shards, checkpoints, model_weights, model_versions."
    )
    delete_versions: tuple[str, ...] = Field(
        default=(), description="NAME/VERSION entries to delete whatever their age (never protected ones)."
    )
    dry_run: bool = Field(default=False, description="List what would go; delete nothing.")

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: tuple[Kind, ...]) -> tuple[Kind, ...]:
        if not v:
            raise ValueError(f"kinds must name at least one of {list(KINDS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"kinds lists a kind twice: {list(v)}")
        return v

    @field_validator("delete_versions")
    @classmethod
    def _refs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [ref for ref in v if not _VERSION_REF.match(ref)]
        if bad:
            raise ValueError(
                f"delete_versions entries must look like NAME/VERSION (e.g. digits-classifier/3): {bad}"
            )
        return v


class RetentionItem(BaseModel):
    """One thing retention found: a storage directory (URI) or a model version (NAME/VERSION)."""

    kind: Kind
    target: str
    age_days: float
    bytes: int | None = None
    reason: str


class RetentionPlan(BaseModel):
    """What would be deleted and what was spared (old enough, but protected), with the reasons."""

    policy: RetentionPolicy
    storage_root: str
    planned_at: float
    delete: list[RetentionItem]
    protected: list[RetentionItem]


class RetentionResult(BaseModel):
    dry_run: bool
    planned: list[RetentionItem] = Field(description="What the plan listed for deletion.")
    deleted: list[RetentionItem]
    already_gone: list[RetentionItem] = Field(description="Listed in the plan, but deleted meanwhile.")


def plan_retention(
    *, policy: RetentionPolicy, tracking_uri: str, storage_root: str, home: Path, now: float | None = None
) -> RetentionPlan:
    """Decide what ``policy`` deletes; deletes nothing.

    Args:
        policy: The retention policy.
        tracking_uri: MLflow tracking/registry URI.
        storage_root: fsspec root holding shards/, checkpoints/ and models/.
        home: MMS_HOME, where running servers keep their leases.
        now: The time ages are measured from (default: now). Leases always use the wall clock.

    Raises:
        RetentionError: ``delete_versions`` names a version that does not exist or is protected
            (aliased, served, among the last N, sibling of a kept one); nothing is deleted then.
    """
    now = time.time() if now is None else now
    leased = {(lease.model, v) for lease in active_leases(home=home) for v in lease.versions}
    versions = list_versions(tracking_uri=tracking_uri)
    delete, protected = _plan_versions(policy=policy, versions=versions, leased=leased, now=now)
    doomed = {i.target for i in delete}
    kept = [v for v in versions if v.ref not in doomed]
    active = [
        r for r in running_runs(tracking_uri=tracking_uri) if now - r.started_s < policy.max_age_days * DAY_S
    ]
    refs = {
        "shards": {v.tags[TAG_MANIFEST]: f"kept version {v.ref}" for v in kept if TAG_MANIFEST in v.tags}
        | {r.manifest_hash: f"training run {r.run_id} in progress" for r in active if r.manifest_hash},
        "model_weights": {v.run_id: f"kept version {v.ref}" for v in kept if v.run_id}
        | {r.run_id: f"training run {r.run_id} in progress" for r in active},
        "checkpoints": {},
    }
    for kind, directory in DIRS.items():
        if kind not in policy.kinds:
            continue
        for uri in _entries(storage.join(storage_root, directory)):
            item = _storage_item(kind=kind, uri=uri, policy=policy, now=now, refs=refs[kind])
            if item is not None:
                (protected if item.reason.startswith("protected") else delete).append(item)
    return RetentionPlan(
        policy=policy, storage_root=storage_root, planned_at=now, delete=delete, protected=protected
    )


def apply_retention(
    *, plan: RetentionPlan, tracking_uri: str, on_delete: Callable[[RetentionItem], None] | None = None
) -> RetentionResult:
    """Delete what ``plan`` lists (nothing on a dry run); each delete is logged and passed to ``on_delete``.

    Model versions go first: a run stopped midway never leaves a registered version whose data is gone.
    Raises RetentionError for a storage target outside the plan's root (a tampered plan).
    """
    if plan.policy.dry_run:
        return RetentionResult(dry_run=True, planned=plan.delete, deleted=[], already_gone=[])
    for item in plan.delete:
        if item.kind != "model_versions":
            _check_inside(plan.storage_root, item)
    doomed = {i.target for i in plan.delete if i.kind == "model_versions"}
    by_ref = {v.ref: v for v in list_versions(tracking_uri=tracking_uri)}
    keep_ids = {v.model_id for ref, v in by_ref.items() if ref not in doomed and v.model_id}
    deleted, gone = [], []
    for item in sorted(plan.delete, key=lambda i: i.kind != "model_versions"):
        if item.kind == "model_versions":
            name, _, version = item.target.partition("/")
            info = by_ref.get(item.target)
            done = info is not None and delete_version(
                tracking_uri=tracking_uri,
                name=name,
                version=version,
                model_id=info.model_id,
                keep_model_ids=keep_ids,
            )
        else:
            fs, path = storage.fs_and_path(item.target)
            done = fs.exists(path)
            if done:
                fs.rm(path, recursive=True)
        (deleted if done else gone).append(item)
        if done:
            log.info("retention deleted %s %s (%s)", item.kind, item.target, item.reason)
            if on_delete is not None:
                on_delete(item)
    return RetentionResult(dry_run=False, planned=plan.delete, deleted=deleted, already_gone=gone)


def _plan_versions(
    *, policy: RetentionPolicy, versions: list[VersionInfo], leased: set[tuple[str, str]], now: float
) -> tuple[list[RetentionItem], list[RetentionItem]]:
    """Split versions into (to delete, protected); raises RetentionError for a protected explicit target."""
    if "model_versions" not in policy.kinds:
        if policy.delete_versions:
            raise RetentionError(
                "delete_versions is set but kinds leaves out model_versions; add it to kinds"
            )
        return [], []
    refs = {v.ref for v in versions}
    missing = [r for r in policy.delete_versions if r not in refs]
    if missing:
        raise RetentionError(f"delete_versions names versions that are not registered: {missing}")
    why = _protections(policy=policy, versions=versions, leased=leased)
    conflicts = [f"{r} ({why[r]})" for r in policy.delete_versions if r in why]
    if conflicts:
        raise RetentionError(
            f"the retention policy would delete protected model versions: {'; '.join(conflicts)}. "
            "Move the alias first (e.g. `MlflowClient().set_registered_model_alias(...)`), stop the "
            "server, lower keep_last_versions, or drop them from delete_versions"
        )
    delete, protected = [], []
    for v in sorted(versions, key=lambda v: (v.name, int(v.version))):
        age = (now - v.created_s) / DAY_S
        explicit = v.ref in policy.delete_versions
        if not explicit and age <= policy.max_age_days:
            continue
        if v.ref in why:
            protected.append(
                RetentionItem(
                    kind="model_versions", target=v.ref, age_days=age, reason=f"protected: {why[v.ref]}"
                )
            )
        else:
            reason = "named in delete_versions" if explicit else f"older than {policy.max_age_days:g} days"
            delete.append(RetentionItem(kind="model_versions", target=v.ref, age_days=age, reason=reason))
    return delete, protected


def _protections(
    *, policy: RetentionPolicy, versions: list[VersionInfo], leased: set[tuple[str, str]]
) -> dict[str, str]:
    """NAME/VERSION -> why it must stay (alias, lease, last N, sibling of a kept version)."""
    refs = {v.ref for v in versions}
    newest: dict[str, list[str]] = {}
    for v in sorted(versions, key=lambda v: -int(v.version)):
        newest.setdefault(v.name, []).append(v.version)
    why: dict[str, str] = {}
    for v in versions:
        if v.aliases:
            why[v.ref] = f"holds alias {', '.join('@' + a for a in v.aliases)}"
        elif (v.name, v.version) in leased:
            why[v.ref] = "served by a running server (lease)"
        elif v.version in newest[v.name][: policy.keep_last_versions]:
            why[v.ref] = f"one of the last {policy.keep_last_versions} versions of {v.name}"
    for v in versions:  # an int8 version and its fp32 parent go together
        parent = f"{v.name}/{v.tags[TAG_PARENT]}" if TAG_PARENT in v.tags else None
        if parent and v.ref not in why and parent in why:
            why[v.ref] = f"int8 sibling of kept {parent}"
        elif parent and parent not in why and v.ref in why and parent in refs:
            why[parent] = f"fp32 parent of kept {v.ref}"
    return why


def _storage_item(
    *, kind: Kind, uri: str, policy: RetentionPolicy, now: float, refs: dict[str, str]
) -> RetentionItem | None:
    """The item for directory ``uri`` if it is old enough to matter (deleted or protected), else None."""
    newest, size = _newest_and_size(uri)
    age = (now - newest) / DAY_S
    if age <= policy.max_age_days:
        return None
    key = _reference_key(kind, uri)
    if key is not None and key in refs:
        return RetentionItem(
            kind=kind, target=uri, age_days=age, bytes=size, reason=f"protected: used by {refs[key]}"
        )
    return RetentionItem(
        kind=kind, target=uri, age_days=age, bytes=size, reason=f"older than {policy.max_age_days:g} days"
    )


def _reference_key(kind: Kind, uri: str) -> str | None:
    """What a kept version would refer to this directory by: manifest hash (shards), run id (weights)."""
    if kind == "model_weights":
        return uri.rstrip("/").rsplit("/", 1)[-1]
    if kind == "shards":
        try:
            return load_manifest(storage.join(uri, "manifest.json")).hash
        except (MMSError, OSError, ValueError):
            return None  # no (valid) manifest: an interrupted write, nothing refers to it
    return None


def _entries(root: str) -> list[str]:
    fs, path = storage.fs_and_path(root)
    if not fs.exists(path):
        return []
    prefix = root.rstrip("/")
    return sorted(
        f"{prefix}/{e['name'].rstrip('/').rsplit('/', 1)[-1]}"
        for e in fs.ls(path, detail=True)
        if e["type"] == "directory"
    )


def _newest_and_size(uri: str) -> tuple[float, int]:
    """Newest modification time (epoch seconds) of any file below ``uri`` (or of ``uri``), total bytes."""
    fs, path = storage.fs_and_path(uri)
    files = list(fs.find(path, detail=True).values()) or [fs.info(path)]
    times = [t for t in (_mtime(info) for info in files) if t is not None]
    # No time at all (a store that reports none): treat as brand new rather than guess old.
    return (max(times) if times else time.time()), sum(int(i.get("size") or 0) for i in files)


def _mtime(info: dict) -> float | None:
    value = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) if value is not None else None


def _check_inside(root: str, item: RetentionItem) -> None:
    """A storage target must be exactly one directory below ``<root>/<its kind's dir>``."""
    base = f"{root.rstrip('/')}/{DIRS[item.kind]}/"
    name = item.target[len(base) :] if item.target.startswith(base) else ""
    if not name or "/" in name.strip("/") or name in {".", ".."}:
        raise RetentionError(f"refusing to delete {item.target}: not a {item.kind} directory under {base}")
