"""The optimizer and learning-rate schedule a training spec asks for, shared by every strategy."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from mms_core.training.spec import TrainSpec


def make_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    """The spec's optimizer over ``model``'s parameters (fused AdamW on CUDA)."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay)
    fused = next(model.parameters()).is_cuda  # fused AdamW kernels exist on CUDA only
    return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, fused=fused)


def make_scheduler(
    optimizer: torch.optim.Optimizer, spec: TrainSpec, *, total_steps: int
) -> tuple[torch.optim.lr_scheduler.LRScheduler, Callable[[int], float]]:
    """The LR schedule and its closed form (factor at a step), which lets a resumed run seek to it."""
    total = max(1, total_steps)
    if spec.schedule == "cosine":

        def factor(step: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    else:

        def factor(step: int) -> float:
            return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), factor


def seek_schedule(
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    optimizer: torch.optim.Optimizer,
    factor: Callable[[int], float],
    *,
    step: int,
) -> None:
    """Put the schedule and the optimizer's learning rates where they are after ``step`` steps."""
    scheduler.last_epoch = step
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * factor(step)
