"""The built-in networks: ``mlp``, ``cnn`` and ``gpt`` (mms_portable/gpt.py).

Every builder takes ``in_features`` and ``n_classes`` (from the data manifest) plus its own
keyword arguments, and returns an ``nn.Module`` mapping (batch, in_features) -> logits. MMS's
model zoo (mms_core.models.zoo) is this table plus user models by import path; only the networks
here travel with a registered model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mms_portable.errors import PortableModelError
from mms_portable.gpt import gpt


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
        raise PortableModelError(
            f"model 'cnn' needs a square number of features (got {in_features}); use 'mlp'"
        )
    return _SquareCNN(side=side, n_classes=n_classes, channels=channels, hidden=hidden)


ZOO: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "gpt": gpt}


def builder_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A package's builder kwargs as the builder takes them: JSON turned the tuple ``hidden`` into a list."""
    kwargs = dict(kwargs)
    if "hidden" in kwargs and isinstance(kwargs["hidden"], list):
        kwargs["hidden"] = tuple(kwargs["hidden"])
    return kwargs


def build(*, name: str, kwargs: dict[str, Any], in_features: int, n_classes: int) -> nn.Module:
    """The built-in network ``name`` for this input width and class count.

    Raises:
        PortableModelError: ``name`` is not a built-in network, or it rejects the arguments.
    """
    if name not in ZOO:
        raise PortableModelError(
            f"model {name!r} is not one of the built-in networks {sorted(ZOO)}: only those load without MMS"
        )
    try:
        return ZOO[name](in_features=in_features, n_classes=n_classes, **builder_kwargs(kwargs))
    except TypeError as exc:
        raise PortableModelError(f"model {name!r} rejected its arguments {sorted(kwargs)}: {exc}") from exc
