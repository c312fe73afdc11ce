"""PipelineSpec: one typed description of a training run (YAML + --set overrides).

Each section's model lives beside the code that owns it; this module only composes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mms_core import storage
from mms_core.compress import CompressSpec
from mms_core.data.ingest import DataSpec
from mms_core.data.shard import ShardSpec
from mms_core.errors import SpecError
from mms_core.evaluate import EvalSpec
from mms_core.models import ModelSpec
from mms_core.training.spec import TrainSpec


class RegisterSpec(BaseModel):
    """Where the model goes in the MLflow registry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(
        default="digits-classifier",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Registered model name.",
    )
    experiment: str = Field(default="mms", description="MLflow experiment of the runs.")


class PipelineSpec(BaseModel):
    """A whole training-pipeline run: data -> shards -> training -> evaluation -> compression -> registry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(default="digits", description="Run name (shown in Prefect and MLflow).")
    data: DataSpec = Field(default_factory=DataSpec)
    preprocess: ShardSpec = Field(default_factory=ShardSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainSpec = Field(default_factory=TrainSpec)
    evaluate: EvalSpec = Field(default_factory=EvalSpec)
    compress: CompressSpec = Field(default_factory=CompressSpec)
    registry: RegisterSpec = Field(default_factory=RegisterSpec)

    @property
    def hash(self) -> str:
        """Content hash of the spec's JSON form, in which secrets are masked (see DataSpec): a
        credential neither shows through the hash nor changes it when it is rotated."""
        return storage.canonical_hash(self.model_dump(mode="json"))

    def masked_fields(self) -> list[str]:
        """Dotted fields whose JSON form (MLflow params, Prefect parameters) hides a credential."""
        return [f"data.{name}" for name in self.data.masked_fields()]


def load_spec(path: str | Path | None = None, *, overrides: list[str] = ()) -> PipelineSpec:
    """Read a YAML spec (or the defaults), apply ``key.sub=value`` overrides, validate.

    Raises:
        SpecError: unreadable file, malformed override, or a value that fails validation.
    """
    raw = read_raw_spec(path, overrides=overrides)
    if "tuning" in raw:
        raise SpecError(
            f"spec {path} has a 'tuning' section: run it with `mms tune {path}`, or remove the section"
        )
    return validate_spec(raw, path=path)


def read_raw_spec(path: str | Path | None, *, overrides: list[str] = ()) -> dict[str, Any]:
    """The YAML mapping of ``path`` (empty for None) with ``key.sub=value`` overrides applied.

    Raises:
        SpecError: unreadable file, not a mapping, or a malformed override.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError(f"cannot read spec {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise SpecError(f"spec {path} must be a YAML mapping, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"override {item!r} must look like section.key=value (e.g. training.epochs=5)")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise SpecError(f"override {item!r}: value is not valid YAML ({exc.problem}); quote it") from None
        set_dotted(raw, key.strip().split("."), parsed)
    return raw


def validate_spec(raw: dict[str, Any], *, path: str | Path | None = None) -> PipelineSpec:
    """``raw`` as a PipelineSpec, or a SpecError listing every field that fails (with ``path``)."""
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SpecError(f"invalid spec{f' {path}' if path else ''}: {problems}") from None


def set_dotted(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        node = target.setdefault(key, {})
        if not isinstance(node, dict):
            raise SpecError(f"cannot set {'.'.join(keys)}: {key} is not a section")
        target = node
    target[keys[-1]] = value
