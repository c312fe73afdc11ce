"""evaluate(), gate() and confusion_png() on models whose predictions are known in advance."""

import io

import numpy as np
import pytest
import torch
from torch import nn

from mms_core.evaluate import EvalSpec, evaluate, gate, predict_classes
from mms_core.plots import confusion_png

N_CLASSES = 4


class EchoClassifier(nn.Module):
    """Predicts the class written in column 0 of each row: logits are a one-hot of that value."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        return nn.functional.one_hot(x[:, 0].long(), self.n_classes).float() * 5.0 - 1.0


def _rows(pred: list[int]) -> np.ndarray:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(len(pred), 3)).astype(np.float32)
    x[:, 0] = pred
    return x


def _by_hand(y: list[int], pred: list[int], n: int) -> tuple[float, list[list[int]], float]:
    cm = [[0] * n for _ in range(n)]
    for t, p in zip(y, pred, strict=True):
        cm[t][p] += 1
    acc = sum(cm[i][i] for i in range(n)) / len(y)
    f1s = []
    for c in range(n):
        tp = cm[c][c]
        fp = sum(cm[r][c] for r in range(n)) - tp
        fn = sum(cm[c]) - tp
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return acc, cm, sum(f1s) / n


def test_evaluate_matches_hand_computed_accuracy_confusion_and_f1():
    y = [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 0, 2]
    pred = [0, 1, 1, 1, 2, 2, 0, 3, 3, 1, 0, 2]
    model = EchoClassifier(N_CLASSES)
    res = evaluate(model=model, x=_rows(pred), y=np.asarray(y), n_classes=N_CLASSES, batch_size=5)

    acc, cm, f1 = _by_hand(y, pred, N_CLASSES)
    assert res.rows == len(y)
    assert res.accuracy == pytest.approx(acc)
    assert res.accuracy == pytest.approx(8 / 12)
    assert res.confusion == cm
    assert res.macro_f1 == pytest.approx(f1)
    # batched in chunks of batch_size and run in eval mode
    assert model.calls == [5, 5, 2]
    assert model.training is False


def test_evaluate_counts_classes_absent_from_data_in_confusion_shape():
    # class 3 never appears in y nor pred: the matrix is still n_classes x n_classes
    y = [0, 1, 2, 2]
    pred = [0, 1, 2, 1]
    res = evaluate(model=EchoClassifier(N_CLASSES), x=_rows(pred), y=np.asarray(y), n_classes=N_CLASSES)
    assert res.confusion == _by_hand(y, pred, N_CLASSES)[1]
    assert len(res.confusion) == N_CLASSES and all(len(r) == N_CLASSES for r in res.confusion)
    assert res.accuracy == pytest.approx(0.75)


def test_predict_classes_is_argmax_of_logits():
    pred = [3, 2, 1, 0, 0, 2]
    out = predict_classes(model=EchoClassifier(N_CLASSES), x=_rows(pred), batch_size=4)
    assert out.tolist() == pred


@pytest.mark.parametrize(
    ("accuracy", "champion", "minimum", "passed", "alias"),
    [
        (0.85, None, 0.9, False, "candidate"),  # below minimum, no champion
        (0.85, 0.5, 0.9, False, "candidate"),  # below minimum even though it beats champion
        (0.95, 0.93, 0.9, True, "champion"),  # beats champion
        (0.93, 0.93, 0.9, False, "candidate"),  # tie
        (0.92, 0.93, 0.9, False, "candidate"),  # loses
        (0.91, None, 0.9, True, "champion"),  # no champion, above minimum
        (0.9, None, 0.9, True, "champion"),  # no champion, exactly the minimum
    ],
)
def test_gate(accuracy, champion, minimum, passed, alias):
    d = gate(accuracy=accuracy, champion_accuracy=champion, spec=EvalSpec(min_accuracy=minimum))
    assert d.passed is passed
    assert d.alias == alias
    assert f"{accuracy:.4f}" in d.reason


def test_gate_reasons_explain_the_decision():
    spec = EvalSpec(min_accuracy=0.9)
    assert "minimum" in gate(accuracy=0.5, champion_accuracy=None, spec=spec).reason
    assert "does not beat champion 0.9500" in gate(accuracy=0.95, champion_accuracy=0.95, spec=spec).reason
    assert "no champion yet" in gate(accuracy=0.95, champion_accuracy=None, spec=spec).reason
    assert "beats champion 0.9200" in gate(accuracy=0.95, champion_accuracy=0.92, spec=spec).reason


def test_confusion_png_is_a_png_image():
    from PIL import Image

    cm = [[5, 1, 0], [0, 4, 2], [1, 0, 7]]
    data = confusion_png(confusion=cm, labels=["a", "b", "c"], title="test")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.format == "PNG"
        assert img.width > 50 and img.height > 50
