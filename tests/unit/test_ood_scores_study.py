"""The OOD-score study's pieces on tiny synthetic features, without a backbone: the threshold is the
finite-sample quantile, each feature score ranks a far cluster stranger than held-out own points,
the flat guard rejects what has no contrast, and the draws keep test, calibration and training apart."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from benchmarks.ood_scores import (
    BIG,
    Settings,
    bars,
    evaluate,
    fit_scores,
    guarded,
    split,
    threshold,
)


def test_threshold_is_the_finite_sample_quantile_and_infinite_when_too_few():
    cal = np.arange(1.0, 20.0)  # 19 scores: rank ceil(20 * 0.9) = 18
    assert threshold(cal, 0.1) == 18.0
    assert threshold(np.arange(5.0), 0.1) == math.inf  # ceil(6 * 0.9) = 6 > 5


def gaussians(n: int, d: int, rng: np.random.Generator, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    y = np.arange(n) % 2
    x = rng.normal(0, 1, (n, d)) + 3 * y[:, None] * (np.arange(d) < 4) + shift
    return np.abs(x).astype(np.float32), y  # non-negative, like pooled ReLU6 features


def test_feature_scores_put_a_far_cluster_above_held_out_own_points():
    rng = np.random.default_rng(0)
    x, y = gaussians(200, 80, rng)
    held, _ = gaussians(100, 80, rng)
    far, _ = gaussians(100, 80, rng)
    far[:, 40:50] += 10  # another direction, so scores on normalised features see it too
    head = torch.nn.Linear(80, 2)
    scores = fit_scores(x, y, 2, head)
    for name in ("maha", "maha_pca16", "maha_ppca16", "maha_ppca16_unit", "residual_pca16", "knn5"):
        s = scores[name]
        fig = evaluate({"cal": s.fn(held[:50]), "test": s.fn(held[50:]), "far": s.fn(far)}, 0.1)
        assert fig["auroc"]["far"] > 0.95, name
        assert fig["rejected"]["far"] > 0.9, name
        assert fig["kept"] > 0.7, name
    assert scores["maha_pca16"].constants == 80 * 16 + 80 + 2 * 16  # projection, centre, class means


def test_flat_guard_rejects_images_without_contrast_whatever_the_score():
    s = {"cal": np.array([1.0, 2.0]), "flat": np.array([0.0, 0.5])}
    contrast = {"cal": np.array([30.0, 40.0]), "flat": np.array([0.0, 1.0])}
    out = guarded(s, contrast)
    assert out["cal"].tolist() == [1.0, 2.0] and out["flat"].tolist() == [BIG, BIG]


def test_bars_need_own_kept_most_foreign_and_nearly_all_synthetic_rejected():
    good = {"kept": 0.86, "rejected": {"lfw": 0.6, "flat": 0.99}}
    assert bars(good, 0.1)
    assert not bars({**good, "kept": 0.84}, 0.1)
    assert not bars({**good, "rejected": {"lfw": 0.5, "flat": 0.99}}, 0.1)
    assert not bars({**good, "rejected": {"lfw": 0.6, "flat": 0.98}}, 0.1)


def test_draws_keep_test_calibration_and_training_apart_and_balanced():
    frame = pd.DataFrame({"sha256": [f"{i:03d}" for i in range(200)], "label": ["a", "b"] * 100})
    s = Settings(train_per_class=40, cal_images=20, test_per_class=25)
    for seed in (0, 1):
        parts = split(frame, s, seed)
        shas = [set(v["sha256"]) for v in parts.values()]
        assert not (shas[0] & shas[1] or shas[0] & shas[2] or shas[1] & shas[2])
        assert {k: len(v) for k, v in parts.items()} == {"train": 80, "cal": 20, "test": 50}
        assert (parts["cal"]["label"].value_counts() == 10).all()
    assert set(split(frame, s, 0)["test"]["sha256"]) != set(split(frame, s, 1)["test"]["sha256"])
