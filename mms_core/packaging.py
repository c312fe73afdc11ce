"""A trained model on disk: weights (safetensors, fp32 or int8) + mms_model.json (how to
rebuild it: zoo/user model spec, feature names, classes, scaler stats). No pickle anywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel
from safetensors.torch import load as st_load
from torch import nn

from mms_core.compress import load_quantized
from mms_core.data.shard import Manifest
from mms_core.models import ModelSpec, build_model

WEIGHTS = "weights.safetensors"
CONFIG = "mms_model.json"


class PackageConfig(BaseModel):
    format: Literal["fp32", "int8"]
    model: ModelSpec
    features: list[str]
    classes: list[int | str]
    mean: list[float]
    std: list[float]

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, *, model: ModelSpec, format: Literal["fp32", "int8"]
    ) -> PackageConfig:
        return cls(
            format=format,
            model=model,
            features=manifest.features,
            classes=manifest.classes,
            mean=manifest.mean,
            std=manifest.std,
        )


def write_package(*, directory: Path, config: PackageConfig, weights: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / WEIGHTS).write_bytes(weights)
    (directory / CONFIG).write_text(config.model_dump_json(indent=2))
    return directory


def read_package(directory: Path) -> tuple[PackageConfig, bytes]:
    """The (config, weights) that :func:`write_package` stored in ``directory``."""
    config = PackageConfig.model_validate(json.loads((directory / CONFIG).read_text()))
    return config, (directory / WEIGHTS).read_bytes()


def build_from_bytes(*, config: PackageConfig, weights: bytes) -> nn.Module:
    """Rebuild the network from config and load its weights (int8 packages get int8 kernels)."""
    model = build_model(spec=config.model, in_features=len(config.features), n_classes=len(config.classes))
    if config.format == "int8":
        return load_quantized(model=model, data=weights)
    model.load_state_dict(st_load(weights))
    return model.eval()


class Predictor:
    """Scales raw feature rows with the training stats and returns class labels (or probabilities)."""

    def __init__(self, *, config: PackageConfig, weights: bytes) -> None:
        self.config = config
        self.model = build_from_bytes(config=config, weights=weights)
        self._mean = np.asarray(config.mean, dtype=np.float32)
        self._std = np.asarray(config.std, dtype=np.float32)

    @classmethod
    def from_directory(cls, directory: Path) -> Predictor:
        config, weights = read_package(directory)
        return cls(config=config, weights=weights)

    def check_columns(self, columns: list[str]) -> None:
        missing = [c for c in self.config.features if c not in columns]
        if missing:
            raise ValueError(
                f"input is missing {len(missing)} feature column(s) the model needs, e.g. {missing[:5]}; "
                f"expected columns: {self.config.features[:5]}..."
            )

    def logits(self, frame: pd.DataFrame) -> torch.Tensor:
        self.check_columns(list(frame.columns))
        return self.logits_array(frame[self.config.features].to_numpy(dtype=np.float32))

    @torch.no_grad()
    def logits_array(self, x: np.ndarray) -> torch.Tensor:
        """Logits for raw rows already in feature order (float32, shape [rows, features])."""
        return self.model(torch.from_numpy(np.ascontiguousarray((x - self._mean) / self._std)))

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        """Class labels for raw rows in feature order: the online and streaming paths (no pandas)."""
        return np.asarray(self.config.classes)[self.logits_array(x).argmax(1).numpy()]

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.config.classes)[self.logits(frame).argmax(1).numpy()]

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return torch.softmax(self.logits(frame), dim=1).numpy()
