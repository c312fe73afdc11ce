"""A package on disk (``mms_model.json`` + ``weights.safetensors``) turned into class labels.

The package's config (written by mms_core.packaging) names the network and its kwargs, the
feature columns, the classes, the training mean and std, the weights' format (fp32 or int8) and
their sha256. :class:`Predictor` standardises raw rows with those statistics, runs the network and
maps the argmax to class labels: MMS's own predictor is this class, so a model taken out of MMS
predicts exactly what MMS predicts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load as st_load
from torch import nn

from mms_portable.errors import PortableModelError
from mms_portable.quantized import load_quantized
from mms_portable.zoo import build

WEIGHTS = "weights.safetensors"
CONFIG = "mms_model.json"


def check_weights(*, model: str, format: str, recorded: str | None, weights: bytes) -> None:
    """Refuse weights whose sha256 differs from the one the package recorded (if it recorded one).

    Raises:
        PortableModelError: naming the package's model and format, and both hashes.
    """
    if recorded is None:
        return  # registered before packages recorded a hash
    actual = hashlib.sha256(weights).hexdigest()
    if actual != recorded:
        raise PortableModelError(
            f"package of model {model!r} ({format}) has weights with sha256 {actual},"
            f" not the {recorded} it recorded when written: the weights were altered or"
            " corrupted after packaging; load an intact version or re-register the model from its run"
        )


def load_weights(*, model: nn.Module, weights: bytes, format: str) -> nn.Module:
    """Load a package's weights into the freshly built ``model`` (int8 packages get int8 kernels)."""
    if format == "int8":
        return load_quantized(model=model, data=weights)
    model.load_state_dict(st_load(weights))
    return model.eval()


class Predictor:
    """Scales raw feature rows with the training stats and returns class labels (or probabilities)."""

    def __init__(
        self,
        *,
        model: nn.Module,
        features: list[str],
        classes: list[int | str],
        mean: list[float],
        std: list[float],
    ) -> None:
        """Wrap a network whose weights are loaded (see :func:`load_weights`)."""
        self.model = model
        self.features = list(features)
        self.classes = list(classes)
        self._mean = np.asarray(mean, dtype=np.float32)
        self._std = np.asarray(std, dtype=np.float32)

    def check_columns(self, columns: list[str]) -> None:
        missing = [c for c in self.features if c not in columns]
        if missing:
            raise ValueError(
                f"input is missing {len(missing)} feature column(s) the model needs, e.g. {missing[:5]}; "
                f"expected columns: {self.features[:5]}..."
            )

    def logits(self, frame: pd.DataFrame) -> torch.Tensor:
        self.check_columns(list(frame.columns))
        return self.logits_array(frame[self.features].to_numpy(dtype=np.float32))

    @torch.no_grad()
    def logits_array(self, x: np.ndarray) -> torch.Tensor:
        """Logits for raw rows already in feature order (float32, shape [rows, features])."""
        return self.model(torch.from_numpy(np.ascontiguousarray((x - self._mean) / self._std)))

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        """Class labels for raw rows in feature order: the online and streaming paths (no pandas)."""
        return np.asarray(self.classes)[self.logits_array(x).argmax(1).numpy()]

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.classes)[self.logits(frame).argmax(1).numpy()]

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return torch.softmax(self.logits(frame), dim=1).numpy()


def model_name(directory: Path) -> str:
    """The network a package names: a built-in one (``mlp``, ``cnn``, ``gpt``) or ``pkg.module:build_fn``."""
    return json.loads((directory / CONFIG).read_text())["model"]["name"]


def load_package(directory: Path) -> Predictor:
    """The predictor of the package stored in ``directory``, for a built-in network only.

    Nothing the package names is imported: a network outside the built-in ones is refused.

    Raises:
        PortableModelError: the network is not a built-in one or rejects the package's kwargs, or
            the weights differ from the sha256 the package recorded.
    """
    config = json.loads((directory / CONFIG).read_text())
    weights = (directory / WEIGHTS).read_bytes()
    spec, fmt = config["model"], config["format"]
    check_weights(model=spec["name"], format=fmt, recorded=config.get("weights_sha256"), weights=weights)
    network = build(
        name=spec["name"],
        kwargs=spec.get("kwargs", {}),
        in_features=len(config["features"]),
        n_classes=len(config["classes"]),
    )
    return Predictor(
        model=load_weights(model=network, weights=weights, format=fmt),
        features=config["features"],
        classes=config["classes"],
        mean=config["mean"],
        std=config["std"],
    )
