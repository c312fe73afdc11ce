"""Plots a person would rather look at than read, as PNG bytes for MLflow artifacts."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mms_core.training.spec import EpochMetrics  # noqa: E402


def png_bytes(fig: plt.Figure) -> bytes:
    """Render ``fig`` as PNG bytes and close it."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def confusion_png(*, confusion: list[list[int]], labels: list[str], title: str) -> bytes:
    """Render a confusion matrix as PNG bytes (for MLflow artifacts)."""
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(labels), 0.8 + 0.5 * len(labels)))
    ax.imshow(cm, cmap="Blues")
    ax.set(
        xticks=range(len(labels)),
        yticks=range(len(labels)),
        xticklabels=labels,
        yticklabels=labels,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    for i, j in np.ndindex(cm.shape):
        ax.text(
            j,
            i,
            str(cm[i, j]),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if cm[i, j] > cm.max() / 2 else "black",
        )
    return png_bytes(fig)


def training_curves_png(*, history: list[EpochMetrics], title: str) -> bytes:
    """Loss (train, val) and accuracy (train, val) per epoch."""
    epochs = [m.epoch for m in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [m.train_loss for m in history], label="train")
    ax_loss.plot(epochs, [m.val_loss for m in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    ax_acc.plot(epochs, [m.train_accuracy for m in history], label="train")
    ax_acc.plot(epochs, [m.val_accuracy for m in history], label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return png_bytes(fig)
