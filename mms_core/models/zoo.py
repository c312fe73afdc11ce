"""The model zoo: the built-in networks and loading a user's ``pkg.module:build_fn``.

The built-in networks (``mlp``, ``cnn``, ``gpt``) live in mms_portable, which every registered
model carries so that it loads without MMS; a user's module does not travel with its model.

A run's own spec may name any module (it is the user's code, in the user's run). A registered
package is loaded on servers and workers shared by everyone, so loading one imports only the zoo
and the modules the operator lists in ``MMS_TRUSTED_MODEL_MODULES`` (``trusted=`` below).

Every builder takes ``in_features`` and ``n_classes`` (from the data manifest) plus its own
keyword arguments, and returns an ``nn.Module`` mapping (batch, in_features) -> logits.

For the language model ``gpt`` a row is a window of token ids: ``in_features`` is the sequence
length and ``n_classes`` the vocabulary; its logits are (batch, n_classes, seq), one prediction
per position with the class dimension second (see mms_portable/gpt.py).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from mms_core.config import Settings
from mms_core.errors import ModelLoadError
from mms_portable.errors import PortableModelError
from mms_portable.zoo import ZOO, builder_kwargs
from mms_portable.zoo import cnn as cnn  # re-exported: user models build on the zoo's networks
from mms_portable.zoo import mlp as mlp


class ModelSpec(BaseModel):
    """Which model to build."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        default="mlp", description="'mlp', 'cnn', 'gpt', or a user model 'pkg.module:build_fn'."
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the builder (e.g. hidden, dropout)."
    )


TRUSTED_ENV = "MMS_TRUSTED_MODEL_MODULES"

# Modules a block of code trusts on top of the operator's list, for package loads it cannot pass
# ``trusted=`` to (MLflow loading the pyfunc back while the training run registers it).
_SCOPE_TRUSTED: ContextVar[tuple[str, ...]] = ContextVar("mms_scope_trusted_modules", default=())


def trusted_modules() -> tuple[str, ...]:
    """The modules this process may import to load a package: ``MMS_TRUSTED_MODEL_MODULES``.

    Read from the environment of the process that builds the model, at each load, never from the
    package or the caller's request: the list is the operator's decision, so it is set where the
    operator starts servers and workers. Packages are built on Dask workers (online replicas, the
    batch and stream predictor caches): a LocalCluster's workers inherit the environment of the
    process that started them, and on a cluster the variable must be set on every worker. Plus the
    modules of any enclosing :func:`trusting` block.

    Raises:
        ModelLoadError: the setting (or another MMS_* setting) is malformed.
    """
    try:
        listed = Settings().trusted_model_modules
    except ValidationError as exc:
        raise ModelLoadError(
            f"cannot decide which model modules are trusted: invalid MMS_* setting: {exc}"
        ) from exc
    return listed + _SCOPE_TRUSTED.get()


@contextmanager
def trusting(*, modules: Collection[str]) -> Iterator[None]:
    """Trust ``modules`` for package loads in this block (this thread or task only).

    For a training run registering its own model: MLflow loads the logged pyfunc back to check
    its input example, through a path that cannot take ``trusted=``. The run's own code is not
    the registry's to refuse; this never reaches Dask workers or other requests.

    Args:
        modules: module names (or package prefixes) to trust on top of the operator's list.
    """
    token = _SCOPE_TRUSTED.set(_SCOPE_TRUSTED.get() + tuple(modules))
    try:
        yield
    finally:
        _SCOPE_TRUSTED.reset(token)


def builder_module(name: str) -> str | None:
    """The module a ``pkg.module:build_fn`` model path imports; None for a zoo name."""
    return None if name in ZOO else name.partition(":")[0]


def is_trusted(module: str, *, trusted: Collection[str]) -> bool:
    """Whether ``module`` is listed in ``trusted`` or lies under a listed package prefix."""
    return any(module == t or module.startswith(f"{t}.") for t in trusted)


def resolve_builder(name: str, *, trusted: Collection[str] | None = None) -> Callable[..., nn.Module]:
    """Return the builder for a zoo name or a ``pkg.module:build_fn`` path.

    Args:
        name: a zoo name (``mlp``, ``cnn``, ``gpt``) or ``pkg.module:build_fn``.
        trusted: None: any module (a run building its own model). Otherwise the modules (or
            package prefixes) a loaded package may name; anything else is refused before import.

    Raises:
        ModelLoadError: unknown name, untrusted or missing module, no such callable.
    """
    if name in ZOO:
        return ZOO[name]
    if ":" not in name:
        raise ModelLoadError(f"unknown model {name!r}: use one of {sorted(ZOO)} or 'pkg.module:build_fn'")
    module_name, _, attr = name.partition(":")
    if not module_name or module_name.startswith(".") or not attr:
        raise ModelLoadError(f"model path {name!r} must be an absolute 'pkg.module:build_fn'")
    if trusted is not None and not is_trusted(module_name, trusted=trusted):
        raise ModelLoadError(
            f"model builder {name!r} is not trusted: add {module_name!r} to {TRUSTED_ENV} on the servers "
            f"and workers that load it (only the zoo's {sorted(ZOO)} load without it)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"cannot import module {module_name!r} for model {name!r} ({exc}); "
            f"install the package or add it to PYTHONPATH on every worker"
        ) from exc
    except Exception as exc:  # the user's module raised while importing (SyntaxError, ...)
        raise ModelLoadError(f"importing {module_name!r} for model {name!r} failed: {exc!r}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ModelLoadError(f"module {module_name!r} has no callable {attr!r} (model {name!r})")
    return fn


def check_arguments(*, name: str, builder: Callable[..., nn.Module], kwargs: dict[str, Any]) -> None:
    """Refuse arguments the builder's signature cannot take, naming them, before calling it.

    Raises:
        ModelLoadError: unknown or missing arguments.
    """
    try:
        sig = inspect.signature(builder)
    except (TypeError, ValueError):
        return  # no introspectable signature (a C callable): the call itself reports
    try:
        sig.bind(**kwargs)
    except TypeError as exc:
        params = sig.parameters.values()
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
        unknown = [] if open_ended else sorted(set(kwargs) - named)
        missing = sorted(
            p.name
            for p in params
            if p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in kwargs
        )
        problems = [
            f"{what} {names}" for what, names in (("unknown", unknown), ("missing", missing)) if names
        ]
        own = sorted(set(kwargs) - {"in_features", "n_classes"})
        raise ModelLoadError(
            f"model {name!r} rejected its arguments {own}: {', '.join(problems) or exc}; "
            f"it accepts {sorted(named - {'in_features', 'n_classes'})}: fix the model's kwargs"
        ) from None


def build_model(
    *, spec: ModelSpec, in_features: int, n_classes: int, trusted: Collection[str] | None = None
) -> nn.Module:
    """Build the model described by ``spec`` for the given input width and class count.

    Args:
        spec: the zoo name or import path, and the builder's keyword arguments.
        in_features: input width (from the data manifest).
        n_classes: output classes (from the data manifest).
        trusted: see :func:`resolve_builder`; None (training: the run's own model) imports any module.

    Raises:
        ModelLoadError: the builder cannot be resolved, trusted, called with these arguments, or
            returns something other than an ``nn.Module``.
    """
    builder = resolve_builder(spec.name, trusted=trusted)
    kwargs = builder_kwargs(spec.kwargs)
    check_arguments(
        name=spec.name, builder=builder, kwargs={"in_features": in_features, "n_classes": n_classes, **kwargs}
    )
    try:
        model = builder(in_features=in_features, n_classes=n_classes, **kwargs)
    except ModelLoadError:
        raise
    except PortableModelError as exc:  # a built-in network refused the input width or its kwargs
        raise ModelLoadError(str(exc)) from exc
    except TypeError as exc:
        raise ModelLoadError(f"model {spec.name!r} rejected its arguments {sorted(kwargs)}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"model builder {spec.name!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model
