"""headstart.metrics: numbers checked against a hand-computed example."""

from __future__ import annotations

import numpy as np
import pytest

from headstart.metrics import (
    accuracy_interval,
    ci_metrics,
    ci_text,
    classification_metrics,
    confusion,
    counted,
    interval_fields,
    metrics_markdown,
)


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


def _shuffled(k: int, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).permutation(counted(k, n))


def test_accuracy_interval_is_deterministic_and_holds_the_point():
    a = accuracy_interval(_shuffled(34, 41), n_bootstrap=2000, confidence=0.95, seed=0)
    assert a == accuracy_interval(_shuffled(34, 41), n_bootstrap=2000, confidence=0.95, seed=0)
    assert a["accuracy"] == pytest.approx(34 / 41) and a["n"] == 41 and a["confidence"] == 0.95
    assert a["ci_low"] < a["accuracy"] < a["ci_high"]
    # the example: 0.83 on 41 images is about +-0.12
    assert 0.09 < (a["ci_high"] - a["ci_low"]) / 2 < 0.14
    # on 41 images the percentiles snap to k/41; on more, another seed moves them: the seed is used
    many = [accuracy_interval(_shuffled(333, 401), 500, 0.95, seed) for seed in (0, 0, 1)]
    assert many[0] == many[1] != many[2]


def test_accuracy_interval_narrows_with_more_images():
    small, large = (accuracy_interval(_shuffled(int(0.8 * n), n), 2000, 0.95, 0) for n in (40, 400))
    assert small["accuracy"] == large["accuracy"] == 0.8
    width = {k: v["ci_high"] - v["ci_low"] for k, v in (("small", small), ("large", large))}
    assert width["large"] < 0.5 * width["small"]  # ~ 1 / sqrt(10)


def test_accuracy_interval_matches_the_normal_approximation_on_many_images():
    n, p = 4000, 0.8
    a = accuracy_interval(_shuffled(int(p * n), n), 2000, 0.95, 0)
    half = 1.959964 * np.sqrt(p * (1 - p) / n)  # Wald: the bootstrap's limit for a proportion
    assert a["ci_low"] == pytest.approx(p - half, abs=0.003)
    assert a["ci_high"] == pytest.approx(p + half, abs=0.003)


def test_a_higher_confidence_gives_a_wider_interval():
    narrow, wide = (accuracy_interval(_shuffled(80, 100), 2000, c, 0) for c in (0.8, 0.99))
    assert wide["ci_low"] < narrow["ci_low"] and narrow["ci_high"] < wide["ci_high"]


def test_counts_give_the_same_interval_as_the_images_up_to_resampling_noise():
    """Where a report kept only k of n (selection's validation figures), counted() stands in."""
    exact = accuracy_interval(_shuffled(149, 185), 2000, 0.95, 0)
    from_counts = accuracy_interval(counted(149, 185), 2000, 0.95, 0)
    assert from_counts["accuracy"] == exact["accuracy"]
    assert from_counts["ci_low"] == pytest.approx(exact["ci_low"], abs=0.015)
    assert from_counts["ci_high"] == pytest.approx(exact["ci_high"], abs=0.015)


def test_no_images_and_one_image():
    none = accuracy_interval(np.array([], bool), 100, 0.95, 0)
    assert none["accuracy"] is None and none["ci_low"] is None and none["n"] == 0
    assert (
        interval_fields("selective_accuracy", np.array([], bool), 100, 0.95, 0)["selective_accuracy_ci"]
        is None
    )
    one = accuracy_interval(np.array([True]), 100, 0.95, 0)
    assert one["accuracy"] == one["ci_low"] == one["ci_high"] == 1.0
    perfect = accuracy_interval(np.ones(30, bool), 100, 0.95, 0)  # no spread: the point itself
    assert perfect["ci_low"] == perfect["ci_high"] == 1.0


def test_interval_fields_reach_metrics_and_text():
    f = interval_fields("accuracy", counted(149, 185), 2000, 0.95, 0)
    assert f["ci_confidence"] == 0.95 and f["accuracy_ci"][0] < 149 / 185 < f["accuracy_ci"][1]
    flat = ci_metrics({"accuracy": 0.8, **f, "n": 185}, "test_")
    assert flat == {"test_accuracy_ci_low": f["accuracy_ci"][0], "test_accuracy_ci_high": f["accuracy_ci"][1]}
    assert ci_metrics({"accuracy_ci": None}) == {}
    assert ci_text([0.7514, 0.8595], 0.95) == " (95% CI 0.7514-0.8595)"
    assert ci_text([0.776, 0.891], 0.95, percent=True) == " (95% CI 77.6-89.1%)"
    assert ci_text(None, 0.95) == ""
    m = classification_metrics(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), ["a", "b"])
    md = metrics_markdown(m | {"accuracy_ci": [0.5, 1.0], "ci_confidence": 0.95}, ["a", "b"], "head")
    assert "Accuracy 0.7500 (95% CI 0.5000-1.0000), macro-F1" in md
