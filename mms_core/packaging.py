"""A trained model on disk: weights (safetensors, fp32 or int8) + mms_model.json (how to
rebuild it: zoo/user model spec, feature names, classes, scaler stats, weights sha256). No pickle
anywhere.

Loading a package is a trust boundary: whoever registers a version and moves an alias chooses
what every server and worker builds. So a load imports only the zoo and the operator's
``MMS_TRUSTED_MODEL_MODULES`` (see :func:`mms_core.models.zoo.trusted_modules`), binds the
package's kwargs to the builder's signature before calling it, and checks the weights against
the sha256 the package recorded when it was written.

What turns rows into labels (standardise, run the network, map the argmax to a class) is
mms_portable's Predictor, the code every registered model carries so that it loads without MMS:
the predictor here adds the typed config and the trust boundary around it.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from torch import nn

from mms_core import storage
from mms_core.data.shard import Manifest
from mms_core.errors import ModelLoadError
from mms_core.models import ModelSpec, build_model
from mms_core.models.zoo import builder_module, trusted_modules
from mms_portable import predictor as portable
from mms_portable.errors import PortableModelError
from mms_portable.predictor import CONFIG, WEIGHTS


class PackageConfig(BaseModel):
    """How to rebuild a trained network and prepare its inputs (``mms_model.json``)."""

    format: Literal["fp32", "int8"]
    model: ModelSpec
    features: list[str]
    classes: list[int | str]
    mean: list[float]
    std: list[float]
    weights_sha256: str | None = Field(
        default=None,
        description=(
            "sha256 (hex) of the weights blob, recorded by write_package and checked at load;"
            " None in packages written before it existed, which load unchecked."
        ),
    )

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
    """Write ``weights`` and ``config`` into ``directory``, recording the weights' sha256.

    Raises:
        ValueError: ``config`` already records a different sha256 than these weights have.
    """
    digest = storage.sha256_bytes(weights)
    if config.weights_sha256 not in (None, digest):
        raise ValueError(
            f"package config records weights sha256 {config.weights_sha256} but the weights given have"
            f" {digest}: write the package with the weights it was made for"
        )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / WEIGHTS).write_bytes(weights)
    (directory / CONFIG).write_text(
        config.model_copy(update={"weights_sha256": digest}).model_dump_json(indent=2)
    )
    return directory


def read_package(directory: Path) -> tuple[PackageConfig, bytes]:
    """The (config, weights) that :func:`write_package` stored in ``directory``."""
    config = PackageConfig.model_validate(json.loads((directory / CONFIG).read_text()))
    return config, (directory / WEIGHTS).read_bytes()


def check_weights(*, config: PackageConfig, weights: bytes) -> None:
    """Refuse weights whose sha256 differs from the one the package recorded (if it recorded one).

    Raises:
        ModelLoadError: naming the package's model and format, and both hashes.
    """
    try:
        portable.check_weights(
            model=config.model.name, format=config.format, recorded=config.weights_sha256, weights=weights
        )
    except PortableModelError as exc:
        raise ModelLoadError(str(exc)) from None


def build_from_bytes(
    *, config: PackageConfig, weights: bytes, trusted: Collection[str] | None = None
) -> nn.Module:
    """Rebuild the network from config and load its weights (int8 packages get int8 kernels).

    Args:
        config: the package's config.
        weights: the package's weights blob (safetensors).
        trusted: modules (or package prefixes) the model's builder may come from besides the zoo.
            None: the operator's ``MMS_TRUSTED_MODEL_MODULES``, read in this process (a Dask
            worker, for the servers and batch), so serving code needs no argument for it.

    Raises:
        ModelLoadError: the weights do not match the recorded sha256, the builder is not trusted
            (nothing is imported then), or it rejects the package's kwargs.
    """
    check_weights(config=config, weights=weights)
    if trusted is None:
        # A zoo model needs no list: reading the settings for it would only add a way to fail.
        trusted = trusted_modules() if builder_module(config.model.name) else ()
    model = build_model(
        spec=config.model, in_features=len(config.features), n_classes=len(config.classes), trusted=trusted
    )
    return portable.load_weights(model=model, weights=weights, format=config.format)


class Predictor(portable.Predictor):
    """Scales raw feature rows with the training stats and returns class labels (or probabilities)."""

    def __init__(
        self, *, config: PackageConfig, weights: bytes, trusted: Collection[str] | None = None
    ) -> None:
        """Build the network (see :func:`build_from_bytes` for ``trusted`` and the checks)."""
        self.config = config
        super().__init__(
            model=build_from_bytes(config=config, weights=weights, trusted=trusted),
            features=config.features,
            classes=config.classes,
            mean=config.mean,
            std=config.std,
        )

    @classmethod
    def from_directory(cls, directory: Path, *, trusted: Collection[str] | None = None) -> Predictor:
        """The predictor of the package :func:`write_package` stored in ``directory``."""
        config, weights = read_package(directory)
        return cls(config=config, weights=weights, trusted=trusted)
