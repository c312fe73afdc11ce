"""Evaluation on the held-out test split, and the gate that decides the champion."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from torch import nn


class EvalSpec(BaseModel):
    """What a candidate must reach to be registered as champion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_accuracy: float = Field(default=0.9, ge=0, le=1, description="Minimum test accuracy for champion.")
    batch_size: int = Field(default=1024, ge=1, description="Rows per forward pass when evaluating.")


class EvalResult(BaseModel):
    accuracy: float
    macro_f1: float
    confusion: list[list[int]]
    rows: int


class GateDecision(BaseModel):
    passed: bool
    alias: str
    reason: str


@torch.no_grad()
def predict_classes(*, model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Argmax predictions, batch by batch, in eval mode."""
    model.eval()
    out = [
        model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size]))).argmax(1)
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).numpy()


def evaluate(
    *, model: nn.Module, x: np.ndarray, y: np.ndarray, n_classes: int, batch_size: int = 1024
) -> EvalResult:
    """Accuracy, macro-F1 and confusion matrix of ``model`` on (x, y)."""
    pred = predict_classes(model=model, x=x, batch_size=batch_size)
    return EvalResult(
        accuracy=float(accuracy_score(y, pred)),
        macro_f1=float(f1_score(y, pred, average="macro", labels=list(range(n_classes)), zero_division=0)),
        confusion=confusion_matrix(y, pred, labels=list(range(n_classes))).tolist(),
        rows=len(y),
    )


def gate(*, accuracy: float, champion_accuracy: float | None, spec: EvalSpec) -> GateDecision:
    """Champion only if the candidate meets the minimum and beats the current champion (if any)."""
    if accuracy < spec.min_accuracy:
        return GateDecision(
            passed=False, alias="candidate", reason=f"accuracy {accuracy:.4f} < minimum {spec.min_accuracy}"
        )
    if champion_accuracy is not None and accuracy <= champion_accuracy:
        return GateDecision(
            passed=False,
            alias="candidate",
            reason=f"accuracy {accuracy:.4f} does not beat champion {champion_accuracy:.4f}",
        )
    vs = "no champion yet" if champion_accuracy is None else f"beats champion {champion_accuracy:.4f}"
    return GateDecision(
        passed=True, alias="champion", reason=f"accuracy {accuracy:.4f} >= {spec.min_accuracy} and {vs}"
    )
