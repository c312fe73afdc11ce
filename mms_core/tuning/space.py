"""What a tuning study searches and how: the ``tuning:`` section of a spec (``mms tune SPEC``).

A search space maps dotted spec paths (``training.lr``, ``model.kwargs.dropout``) to ranges. Every
problem a space can have is found here, before a trial runs: no parameters, an empty or inverted
range, a log range through zero, a path the trials cannot vary, or a value the spec rejects.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mms_core.errors import SpecError
from mms_core.spec import PipelineSpec, read_raw_spec, set_dotted, validate_spec

# Trials train on the same shards, one worker each, for tuning.trial_epochs epochs: only the
# model and the optimisation settings may vary; these training fields may not.
FIXED_TRAINING = {
    "strategy",
    "epochs",
    "world_size",
    "resume",
    "max_restarts",
    "timeout_s",
    "checkpoint_every",
    "fedavg",
    "fsdp",
    "param_server",
    "hierarchical",
}
TUNABLE_STRATEGIES = ("ddp", "fsdp", "hierarchical")  # the same loop as a one-worker trial


class FloatRange(BaseModel):
    """A real number in [low, high], optionally on a log scale or a grid of ``step``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False
    step: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> FloatRange:
        _check_range(self.low, self.high, self.log, self.step)
        return self

    def candidates(self) -> list[Any]:
        return [self.low, self.high]


class IntRange(BaseModel):
    """An integer in [low, high], optionally on a log scale or every ``step``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["int"] = "int"
    low: int
    high: int
    log: bool = False
    step: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> IntRange:
        _check_range(self.low, self.high, self.log, self.step if self.step != 1 else None)
        return self

    def candidates(self) -> list[Any]:
        return [self.low, self.high]


class Choice(BaseModel):
    """One of ``choices`` (any YAML values, lists included, e.g. layer widths)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Literal["categorical"] = "categorical"
    choices: list[Any] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> Choice:
        keys = [json.dumps(c, sort_keys=True) for c in self.choices]
        if len(set(keys)) != len(keys):
            raise ValueError(f"choices {self.choices} repeat a value; list each once")
        return self

    def candidates(self) -> list[Any]:
        return list(self.choices)


Param = Annotated[FloatRange | IntRange | Choice, Field(discriminator="type")]


class TuneSpec(BaseModel):
    """A tuning study: which spec fields to search, how many trials, how to score and prune them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    params: dict[str, Param] = Field(
        default_factory=lambda: {
            "training.lr": FloatRange(low=1e-4, high=1e-2, log=True),
            "training.weight_decay": FloatRange(low=1e-6, high=1e-2, log=True),
        },
        description="Dotted spec path -> range, e.g. training.lr: {type: float, low: 1e-4, high: 1e-2}.",
    )
    trials: int = Field(default=12, ge=1, description="Trials in the study (a re-run continues to this).")
    parallel: int | None = Field(
        default=None, ge=1, description="Trials at the same time; default one per Dask worker."
    )
    trial_epochs: int = Field(default=4, ge=1, description="Epochs of each trial's short training run.")
    metric: Literal["val_accuracy", "val_loss"] = Field(
        default="val_accuracy", description="Validation score a trial reports each epoch."
    )
    pruner: Literal["median", "successive_halving", "none"] = Field(
        default="median", description="Stops poor trials early from their intermediate scores."
    )
    sampler: Literal["tpe", "random"] = Field(default="tpe", description="How trials pick parameters.")
    seed: int = Field(default=0, description="Sampler seed.")
    study_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Optuna study name; default <spec name>-<hash of spec and space>.",
    )
    retrain: bool = Field(
        default=True, description="Retrain the best configuration in full and register it (gated)."
    )

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        return "maximize" if self.metric == "val_accuracy" else "minimize"


def load_tuning(
    path: str | Path, *, overrides: list[str] = (), trials: int | None = None
) -> tuple[PipelineSpec, TuneSpec]:
    """Read a spec with a ``tuning:`` section (overrides may set ``tuning.*`` too) and check it.

    Raises:
        SpecError: the file or an override is bad, there is no tuning section, or the space is
            empty or inconsistent (see ``check_space``).
    """
    raw = read_raw_spec(path, overrides=overrides)
    tuning_raw = raw.pop("tuning", None)
    if not isinstance(tuning_raw, dict):
        raise SpecError(
            f"spec {path} has no 'tuning' section; add one with the parameters to search "
            "(see examples/digits-tune.yaml)"
        )
    if trials is not None:
        tuning_raw["trials"] = trials
    spec = validate_spec(raw, path=path)
    try:
        tune = TuneSpec.model_validate(tuning_raw)
    except ValidationError as exc:
        problems = "; ".join(f"tuning.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SpecError(f"invalid tuning section in {path}: {problems}") from None
    check_space(spec=spec, tune=tune)
    return spec, tune


def check_space(*, spec: PipelineSpec, tune: TuneSpec) -> None:
    """Raise SpecError unless every parameter can vary in a trial and each bound is a valid spec."""
    if not tune.params:
        raise SpecError(
            "tuning.params is empty: name at least one spec field to search, "
            "e.g. training.lr: {type: float, low: 1e-4, high: 1e-2, log: true}"
        )
    if spec.training.strategy not in TUNABLE_STRATEGIES:
        raise SpecError(
            f"training.strategy={spec.training.strategy!r} cannot be tuned: trials run the "
            f"one-worker training loop, which matches {', '.join(TUNABLE_STRATEGIES)}"
        )
    base = spec.model_dump(mode="json")
    for name, param in tune.params.items():
        _check_path(name)
        for value in param.candidates():
            try:
                PipelineSpec.model_validate(apply_params(base, {name: value}))
            except (ValidationError, SpecError) as exc:
                why = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
                raise SpecError(f"tuning.params.{name}: value {value!r} is not a valid spec: {why}") from None


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the spec mapping ``base`` with each dotted path set to its value."""
    out = copy.deepcopy(base)
    for name, value in params.items():
        set_dotted(out, name.split("."), value)
    return out


def trial_spec(*, spec: PipelineSpec, tune: TuneSpec, params: dict[str, Any]) -> PipelineSpec:
    """The spec a trial trains: ``params`` applied, ``tuning.trial_epochs`` epochs, one worker."""
    # Python mode, not JSON: the JSON form masks the data section's secrets (DataSpec).
    raw = apply_params(spec.model_dump(), params)
    raw["training"] |= {"epochs": tune.trial_epochs, "world_size": 1}
    return PipelineSpec.model_validate(raw)


def best_spec(*, spec: PipelineSpec, params: dict[str, Any]) -> PipelineSpec:
    """The full run of the best trial's parameters (the spec's own epochs and workers)."""
    return PipelineSpec.model_validate(apply_params(spec.model_dump(), params))  # secrets kept


def suggest(trial: optuna.Trial, tune: TuneSpec) -> dict[str, Any]:
    """Ask ``trial`` for one value per parameter."""
    out: dict[str, Any] = {}
    for name, p in tune.params.items():
        if isinstance(p, FloatRange):
            out[name] = trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, IntRange):
            out[name] = trial.suggest_int(name, p.low, p.high, log=p.log, step=p.step)
        elif all(c is None or isinstance(c, bool | int | float | str) for c in p.choices):
            out[name] = trial.suggest_categorical(name, p.choices)
        else:  # Optuna stores only scalar choices: offer lists and mappings as their JSON text
            out[name] = json.loads(trial.suggest_categorical(name, [json.dumps(c) for c in p.choices]))
            trial.set_user_attr(json_attr(name), True)
    return out


def json_attr(name: str) -> str:
    """The trial attribute that marks parameter ``name`` as offered as JSON text."""
    return f"mms.json:{name}"


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if not low < high:
        raise ValueError(f"low={low} must be below high={high}")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0 (got {low})")
    if log and step is not None:
        raise ValueError("a range is either on a log scale or stepped, not both")
    if step is not None and step > high - low:
        raise ValueError(f"step={step} is wider than the range [{low}, {high}]")


def _check_path(name: str) -> None:
    section, _, rest = name.partition(".")
    field = rest.split(".", 1)[0]
    if section == "model" and rest.startswith("kwargs."):
        return
    if section == "training" and field and field not in FIXED_TRAINING:
        return
    raise SpecError(
        f"tuning.params.{name}: trials vary only model.kwargs.* and training.* settings "
        f"(not {', '.join(sorted(FIXED_TRAINING))}); data and shards stay the same for every trial"
    )
