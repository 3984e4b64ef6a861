"""headstart.metrics: numbers checked against a hand-computed example."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from headstart.metrics import classification_metrics, confusion, confusion_png


def test_confusion_rows_true_cols_pred():
    cm = confusion(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_classification_metrics_by_hand():
    # true:  a a a a b b b c c c
    # pred:  a a b c b b a c c b
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2, 1])
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    # confusion: a -> [2,1,1], b -> [1,2,0], c -> [0,1,2]
    assert m["confusion_matrix"] == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(6 / 10)
    # a: tp 2, predicted 3, true 4; b: tp 2, predicted 4, true 3; c: tp 2, predicted 3, true 3
    expected = {
        "a": (2 / 3, 2 / 4, 4),
        "b": (2 / 4, 2 / 3, 3),
        "c": (2 / 3, 2 / 3, 3),
    }
    f1s = []
    for c, (prec, rec, support) in expected.items():
        f1 = 2 * prec * rec / (prec + rec)
        f1s.append(f1)
        got = m["per_class"][c]
        assert got["precision"] == pytest.approx(prec)
        assert got["recall"] == pytest.approx(rec)
        assert got["f1"] == pytest.approx(f1)
        assert got["support"] == support
    assert m["macro_f1"] == pytest.approx(sum(f1s) / 3)  # (4/7 + 4/7 + 2/3) / 3


def test_classification_metrics_never_predicted_class_is_zero_not_nan():
    y_true = np.array([0, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1])  # class c is never predicted, never right
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    c = m["per_class"]["c"]
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 2)
    assert m["per_class"]["b"]["precision"] == pytest.approx(1 / 3)
    assert np.isfinite(m["macro_f1"])
    assert m["accuracy"] == pytest.approx(0.5)


def test_classification_metrics_perfect():
    y = np.array([0, 1, 1, 0])
    m = classification_metrics(y, y, ["x", "y"])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0


def test_confusion_png():
    cm = np.array([[5, 1], [2, 7]])
    data = confusion_png(cm, ["cat", "dog"], "test")
    assert isinstance(data, bytes)
    assert data.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        assert img.width > 100 and img.height > 100
