"""The int8 weight format of a compressed model, written and read back.

On disk, a compressed model keeps each Linear weight as int8 with one fp32 scale per output
row (safetensors); everything else stays fp32. At load time the weights are dequantized and
the Linear layers run as torch dynamic int8 kernels (torch.ao quantize_dynamic, per channel).
"""

from __future__ import annotations

import warnings

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

_Q = ".__int8"
_S = ".__scale"


def quantized_bytes(*, model: nn.Module) -> bytes:
    """Serialise ``model`` with int8 per-row Linear weights; other tensors as fp32."""
    linear_weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    tensors: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        t = t.detach().cpu().float()
        if key in linear_weights:
            scale = t.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            tensors[key + _Q] = torch.round(t / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            tensors[key + _S] = scale.contiguous()
        else:
            tensors[key] = t.contiguous()
    return st_save(tensors)


def load_quantized(*, model: nn.Module, data: bytes, int8_kernels: bool = True) -> nn.Module:
    """Load bytes from :func:`quantized_bytes` into a freshly built float ``model``."""
    raw = st_load(data)
    state = {k: v for k, v in raw.items() if not k.endswith((_Q, _S))}
    for key in [k[: -len(_Q)] for k in raw if k.endswith(_Q)]:
        state[key] = raw[key + _Q].float() * raw[key + _S][:, None]
    model.load_state_dict(state)
    model.eval()
    if not int8_kernels:
        return model
    with warnings.catch_warnings():
        # torch.ao.quantization warns that it moves to torchao; it is still the stock CPU path in 2.13.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
