"""Evaluation on the held-out test split, and the gate that decides the champion.

A causal language model (``causal_lm`` on the module, e.g. the zoo's gpt) is scored per token:
accuracy is next-token accuracy over every position of every window, with the loss and its
perplexity beside it; its confusion matrix (vocabulary squared) is left empty.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import f1_score
from torch import nn


class EvalSpec(BaseModel):
    """What a candidate must reach to be registered as champion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_accuracy: float = Field(default=0.9, ge=0, le=1, description="Minimum test accuracy for champion.")
    batch_size: int = Field(default=1024, ge=1, description="Rows per forward pass when evaluating.")


LM_TOKENS_PER_BATCH = 2**14  # a language model's logits are (rows, vocab, seq): bound them by tokens


class EvalResult(BaseModel):
    accuracy: float
    macro_f1: float
    confusion: list[list[int]]
    rows: int
    loss: float | None = Field(default=None, description="Language models: mean next-token cross-entropy.")
    perplexity: float | None = Field(default=None, description="Language models: exp(loss).")
    tokens: int | None = Field(default=None, description="Language models: tokens predicted.")


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
    """Accuracy, macro-F1 and confusion matrix of ``model`` on (x, y) (language models: see above)."""
    return evaluate_chunks(model=model, chunks=[(x, y)], n_classes=n_classes, batch_size=batch_size)


def evaluate_chunks(
    *,
    model: nn.Module,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    n_classes: int,
    batch_size: int = 1024,
) -> EvalResult:
    """Like :func:`evaluate`, over (x, y) chunks read one at a time (a shard's parts): a
    classifier's memory is one chunk and the confusion matrix, whatever the split's size."""
    if getattr(model, "causal_lm", False):
        parts = list(chunks)  # a language model's test split is a built-in corpus: small
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return evaluate_lm(model=model, x=x, y=y, batch_size=batch_size)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    for x, y in chunks:
        pred = predict_classes(model=model, x=x, batch_size=batch_size)
        confusion += np.bincount(
            np.asarray(y, dtype=np.int64) * n_classes + pred, minlength=n_classes * n_classes
        ).reshape(n_classes, n_classes)
    return _from_confusion(confusion)


def _from_confusion(confusion: np.ndarray) -> EvalResult:
    """Accuracy and macro-F1 (classes with no true and no predicted row count as 0, as sklearn's
    ``zero_division=0``) from the confusion matrix, rows true, columns predicted."""
    tp = np.diag(confusion).astype(np.float64)
    fp, fn = confusion.sum(axis=0) - tp, confusion.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    rows = int(confusion.sum())
    return EvalResult(
        accuracy=float(tp.sum() / rows) if rows else 0.0,
        macro_f1=float(f1.mean()),
        confusion=confusion.tolist(),
        rows=rows,
    )


@torch.no_grad()
def evaluate_lm(*, model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> EvalResult:
    """Per-token metrics of a causal LM on windows ``x`` (rows, seq) whose next tokens are ``y``.

    The targets of a row are its inputs shifted by one with its label appended, as in training.
    Runs on the device of the model's parameters, at most ``LM_TOKENS_PER_BATCH`` tokens at a time.
    """
    model.eval()
    device = next(model.parameters()).device
    rows = max(1, min(batch_size, LM_TOKENS_PER_BATCH // x.shape[1]))
    loss_sum, preds, targets = 0.0, [], []
    for i in range(0, len(x), rows):
        xb = torch.tensor(x[i : i + rows], device=device)  # a copy: shard arrays may be read-only
        yb = torch.tensor(y[i : i + rows], dtype=torch.long, device=device)
        tb = torch.cat([xb[:, 1:].long(), yb[:, None]], dim=1)
        logits, loss = model(xb, tb)
        loss_sum += float(loss) * tb.numel()
        preds.append(logits.argmax(1).flatten().cpu())
        targets.append(tb.flatten().cpu())
    pred, true = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    mean_loss = loss_sum / max(len(true), 1)
    return EvalResult(
        accuracy=float((pred == true).mean()),
        # over the tokens that occur (as target or prediction): the vocabulary may be 50k ids
        macro_f1=float(f1_score(true, pred, average="macro", labels=np.union1d(true, pred), zero_division=0)),
        confusion=[],
        rows=len(x),
        loss=mean_loss,
        perplexity=math.exp(min(mean_loss, 700.0)),  # exp overflows a float past ~709
        tokens=len(true),
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
