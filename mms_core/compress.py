"""Compression: magnitude pruning and int8 weight quantization of Linear layers.

The int8 format itself (:func:`quantized_bytes`, :func:`load_quantized`: int8 Linear weights
with one fp32 scale per output row, run as torch dynamic int8 kernels) lives in
mms_portable.quantized, because it travels with every registered int8 model.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils import prune

from mms_portable.quantized import load_quantized, quantized_bytes

__all__ = ["CompressSpec", "latency_ms", "load_quantized", "prune_linear", "quantized_bytes"]


class CompressSpec(BaseModel):
    """How to compress the trained model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quantize: bool = Field(default=True, description="int8 weights for Linear layers.")
    prune_amount: float = Field(
        default=0.0, ge=0, lt=1, description="Share of smallest Linear weights zeroed."
    )
    max_accuracy_drop: float = Field(
        default=0.01, ge=0, le=1, description="Allowed accuracy loss vs full model."
    )


def prune_linear(*, model: nn.Module, amount: float) -> nn.Module:
    """Zero the ``amount`` smallest-magnitude weights of every Linear layer (in place)."""
    if amount > 0:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                prune.l1_unstructured(module, name="weight", amount=amount)
                prune.remove(module, "weight")
    return model


@torch.no_grad()
def latency_ms(*, model: nn.Module, x: np.ndarray, repeats: int = 30) -> float:
    """Median CPU latency (ms) of one forward pass over the batch ``x``."""
    model.eval()
    xb = torch.from_numpy(np.ascontiguousarray(x))
    model(xb)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(xb)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))
