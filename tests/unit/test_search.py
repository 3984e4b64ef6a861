"""The cross-validated head search (headstart.search) on small synthetic feature sets."""

from __future__ import annotations

import numpy as np
import pytest

from headstart.config import SearchParams, TrainHeadParams
from headstart.search import SEARCHED, cross_validate, plan_folds, search_head
from headstart.training import make_head


def _features(n_per_class: int, classes: int = 3, dim: int = 24, signal: float = 1.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = rng.normal(size=(len(y), dim)) + signal * np.eye(classes, dim)[y]
    return x.astype(np.float32), y


def _params(**search) -> TrainHeadParams:
    return TrainHeadParams(max_epochs=40, patience=5, search=SearchParams(**{"trials": 6, **search}))


def _split(y: np.ndarray, val_every: int = 5):
    val = np.arange(len(y)) % val_every == 0
    return y[~val], y[val], np.concatenate([np.flatnonzero(~val), np.flatnonzero(val)])


def test_small_data_is_cross_validated_over_train_and_val_with_every_class_in_every_fold():
    _, y = _features(20)
    yt, yv, _ = _split(y)
    folds = plan_folds(yt, yv, SearchParams(), seed=0)
    assert folds.mode == "cv" and folds.k == 5 and folds.note is None and len(folds.which) == len(y)
    yy = np.concatenate([yt, yv])
    for k in range(5):
        assert set(yy[folds.which == k]) == {0, 1, 2}  # stratified
    assert "5-fold cross-validation over 60" in folds.describe()


def test_large_data_keeps_the_validation_split():
    _, y = _features(20)
    yt, yv, _ = _split(y)
    folds = plan_folds(yt, yv, SearchParams(cv_max_images=50), seed=0)
    assert folds.mode == "holdout" and folds.k == 1 and "cv_max_images=50" in folds.note
    assert (folds.which[: len(yt)] == -1).all() and (folds.which[len(yt) :] == 0).all()


def test_a_class_smaller_than_the_folds_gets_fewer_folds_and_one_image_gets_the_val_split():
    yt, yv = np.array([0] * 10 + [1, 1]), np.array([0, 0, 1])  # class 1: 3 train+val images
    folds = plan_folds(yt, yv, SearchParams(folds=5), seed=0)
    assert folds.mode == "cv" and folds.k == 3 and "3 folds instead of 5" in folds.note
    yt, yv = np.array([0] * 10 + [1]), np.array([0, 0])  # class 1: a single image
    folds = plan_folds(yt, yv, SearchParams(folds=5), seed=0)
    assert folds.mode == "holdout" and "1 train+val image" in folds.note


def test_the_search_is_reproducible_and_starts_from_the_settings_given():
    x, y = _features(12)
    yt, yv, order = _split(y)
    x = x[order]
    yy = np.concatenate([yt, yv])
    p = _params()
    folds = plan_folds(yt, yv, p.search, seed=3)
    runs = [search_head(x, yy, folds, 3, p, seed=3) for _ in range(2)]
    strip = [[{k: v for k, v in t.items() if k != "wall_s"} for t in r.trials] for r in runs]
    assert strip[0] == strip[1] and runs[0].params == runs[1].params
    first = runs[0].trials[0]
    assert {k: first[k] for k in SEARCHED} == {k: getattr(p, k) for k in SEARCHED}  # the defaults, trial 0
    best = max(t["score"] for t in runs[0].trials if t["score"] is not None)
    assert runs[0].estimate["accuracy"] >= first["cv_accuracy"] - 1e-9  # never worse than the defaults
    assert best == pytest.approx(runs[0].estimate["accuracy"] - 1e-3 * runs[0].estimate["loss"])
    d = runs[0].to_json()
    assert d["mode"] == "cv" and d["n_trials"] == 6 and len(d["trials"]) == 6 and d["refit_epochs"] >= 1
    assert runs[0].refit and runs[0].final_params().max_epochs == runs[0].estimate["epochs"]


def test_another_seed_can_choose_differently_but_a_zero_budget_is_the_settings_given():
    x, y = _features(12)
    yt, yv, order = _split(y)
    p = _params(trials=0)
    folds = plan_folds(yt, yv, p.search, seed=0)
    off = search_head(x[order], np.concatenate([yt, yv]), folds, 3, p, seed=0)
    assert off.params == p and off.estimate is None and not off.refit and off.final_params() == p
    assert "trials is 0" in off.notes[0] and off.to_json()["mode"] == "off"


def test_cross_validation_scores_separable_features_above_noise():
    x, y = _features(15, signal=3.0)
    noise = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    folds = plan_folds(y, y[:0], SearchParams(), seed=0)
    p = _params()
    good, bad = (cross_validate(f, y, folds, 3, p, seed=0) for f in (x, noise))
    assert good["accuracy"] > 0.9 > 0.6 > bad["accuracy"]
    assert len(good["fold_accuracies"]) == 5 and good["accuracy_std"] >= 0 and good["epochs"] >= 1


def test_augmented_views_are_searched_when_they_exist():
    x, y = _features(10)
    views = np.stack([x + 0.05, x - 0.05], 1)
    p = _params(trials=4).model_copy(update={"augment_views": 2})
    folds = plan_folds(y, y[:0], p.search, seed=0)
    s = search_head(x, y, folds, 3, p, seed=0, views=views)
    assert s.trials[0]["augment_views"] == 2  # the settings given: with views
    assert {t["augment_views"] for t in s.trials} <= {0, 2}


def test_a_linear_head():
    head = make_head(24, 3, 0, 0.1)
    assert [type(m).__name__ for m in head] == ["Dropout", "Linear"] and head[1].in_features == 24
