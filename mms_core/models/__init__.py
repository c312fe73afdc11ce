"""Model zoo (mlp, cnn, gpt) and user models by import path "pkg.module:build_fn"."""

from mms_core.models.zoo import ModelSpec, build_model

__all__ = ["ModelSpec", "build_model"]
