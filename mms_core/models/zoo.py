"""Built-in models and loading a user's ``pkg.module:build_fn``.

Every builder takes ``in_features`` and ``n_classes`` (from the data manifest) plus its own
keyword arguments, and returns an ``nn.Module`` mapping (batch, in_features) -> logits.

For the language model ``gpt`` a row is a window of token ids: ``in_features`` is the sequence
length and ``n_classes`` the vocabulary; its logits are (batch, n_classes, seq), one prediction
per position with the class dimension second (see models/gpt.py).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mms_core.errors import ModelLoadError
from mms_core.models.gpt import gpt


class ModelSpec(BaseModel):
    """Which model to build."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        default="mlp", description="'mlp', 'cnn', 'gpt', or a user model 'pkg.module:build_fn'."
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the builder (e.g. hidden, dropout)."
    )


def mlp(
    *, in_features: int, n_classes: int, hidden: tuple[int, ...] = (128, 64), dropout: float = 0.1
) -> nn.Module:
    """A plain multi-layer perceptron."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


class _SquareCNN(nn.Module):
    """Treats the feature vector as a one-channel square image (digits: 8x8)."""

    def __init__(self, *, side: int, n_classes: int, channels: int, hidden: int) -> None:
        super().__init__()
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels * 2, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * 2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, self.side, self.side)))


def cnn(*, in_features: int, n_classes: int, channels: int = 16, hidden: int = 64) -> nn.Module:
    """A small CNN; needs a square number of features."""
    side = math.isqrt(in_features)
    if side * side != in_features:
        raise ModelLoadError(f"model 'cnn' needs a square number of features (got {in_features}); use 'mlp'")
    return _SquareCNN(side=side, n_classes=n_classes, channels=channels, hidden=hidden)


ZOO: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "gpt": gpt}


def resolve_builder(name: str) -> Callable[..., nn.Module]:
    """Return the builder for a zoo name or a ``pkg.module:build_fn`` path."""
    if name in ZOO:
        return ZOO[name]
    if ":" not in name:
        raise ModelLoadError(f"unknown model {name!r}: use one of {sorted(ZOO)} or 'pkg.module:build_fn'")
    module_name, _, attr = name.partition(":")
    if not module_name or module_name.startswith(".") or not attr:
        raise ModelLoadError(f"model path {name!r} must be an absolute 'pkg.module:build_fn'")
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


def build_model(*, spec: ModelSpec, in_features: int, n_classes: int) -> nn.Module:
    """Build the model described by ``spec`` for the given input width and class count."""
    builder = resolve_builder(spec.name)
    kwargs = dict(spec.kwargs)
    if "hidden" in kwargs and isinstance(kwargs["hidden"], list):
        kwargs["hidden"] = tuple(kwargs["hidden"])
    try:
        model = builder(in_features=in_features, n_classes=n_classes, **kwargs)
    except ModelLoadError:
        raise
    except TypeError as exc:
        raise ModelLoadError(f"model {spec.name!r} rejected its arguments {sorted(kwargs)}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"model builder {spec.name!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model
