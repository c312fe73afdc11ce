"""Model FLOPs utilisation (MFU): the share of the accelerator's peak that the model's own FLOPs
use, counted from the model's shape (not from what the kernels happen to execute).

The peak comes from ``MMS_PEAK_TFLOPS`` (per device, in TFLOP/s) when set, else from a table of
dense bf16 tensor-core peaks by CUDA device name. On a CPU there is no sensible default, so MFU
is unknown (None) unless the variable is set.
"""

from __future__ import annotations

import os

import torch

PEAK_ENV = "MMS_PEAK_TFLOPS"
# Dense (non-sparse) bf16 peaks from the vendors' data sheets, TFLOP/s. Longer names first: "H100
# PCIe" must win over "H100" (SXM).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "GH200": 989.0,
    "H200": 989.0,
    "H100": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def peak_flops() -> float | None:
    """Peak FLOP/s of one device: ``MMS_PEAK_TFLOPS``, else the CUDA device's table entry, else None."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def mfu(*, flops_per_token: float, tokens_per_s: float, devices: int = 1) -> float | None:
    """Achieved model FLOP/s per device over the device's peak; None when the peak is unknown.

    Args:
        flops_per_token: Training FLOPs per token (forward and backward), e.g. ``GPT.flops_per_token()``.
        tokens_per_s: Tokens trained on per second, summed over ``devices``.
        devices: Devices that shared the work.
    """
    peak = peak_flops()
    if peak is None:
        return None
    return flops_per_token * tokens_per_s / max(devices, 1) / peak
