"""train_head with its cross-validated search on (the default) on tiny images: the refit on train+val,
the record of every trial, the test split never consulted, and what the refit means for finetune and
calibrate (no clean validation split left: fine-tuning's gate closes, calibration cross-fits)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from headstart.config import load_params
from headstart.stages import NAMES, get
from headstart.training import load_model
from tests.conftest import make_folder, tiny_overrides

SEARCH = ["train_head.search.trials=5", "train_head.search.folds=3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_weights):
    root = tmp_path_factory.mktemp("search")
    data = make_folder(root / "data", per_class=14, classes=("cat", "dog", "owl"))
    overrides = [*tiny_overrides(root, data, tiny_weights), *SEARCH]
    cfg = load_params(None, overrides)
    for name in NAMES[: NAMES.index("train_head") + 1]:
        get(name).function(cfg)
    return cfg, overrides


def _copy(run, tmp_path, *extra):
    cfg, base = run
    shutil.copytree(cfg.project.artifacts_dir, tmp_path / "artifacts")
    return load_params(None, [*base, f"project.artifacts_dir={tmp_path / 'artifacts'}", *extra])


def _read(cfg, stage: str, name: str) -> dict:
    return json.loads((cfg.stage_dir(stage) / name).read_text())


def test_the_head_is_chosen_by_cross_validation_and_refit_on_train_and_val(run):
    cfg, _ = run
    m, s = _read(cfg, "train_head", "metrics.json"), _read(cfg, "train_head", "search.json")
    assert s["searched"] and s["mode"] == "cv" and s["folds"] == 3 and len(s["trials"]) == 5
    assert all(t["state"] in ("COMPLETE", "PRUNED") for t in s["trials"])
    assert m["refit_on_train_val"] and m["val_estimate"] == "cross-validated"
    assert m["val_accuracy"] == m["cv_accuracy"] == s["estimate"]["accuracy"]
    assert m["epochs_run"] == s["refit_epochs"] == s["estimate"]["epochs"]  # the folds' median best epoch
    assert m["settings"] == s["chosen"]
    assert s["line"].startswith("searched 5 trials on 3-fold cross-validation over 33 train+val images: ")
    assert f"refit on train+val for {s['refit_epochs']} epochs" in s["line"]
    head = load_model(cfg.stage_dir("train_head") / "model.pt").classifier.head  # saved and loadable
    widths = [layer.out_features for layer in head if hasattr(layer, "out_features")]
    assert widths == ([3] if s["chosen"]["hidden"] == 0 else [s["chosen"]["hidden"], 3])


def test_poisoned_test_labels_change_nothing_the_search_chooses(run, tmp_path):
    cfg = _copy(run, tmp_path)
    before = _read(cfg, "train_head", "search.json")
    path = cfg.stage_dir("validate") / "manifest.parquet"
    frame = pd.read_parquet(path)
    test = frame["split"] == "test"
    assert test.sum() >= 3
    frame.loc[test, "label"] = frame.loc[test, "label"].map({"cat": "dog", "dog": "owl", "owl": "cat"})
    frame.to_parquet(path)
    get("train_head").function(cfg)
    after = _read(cfg, "train_head", "search.json")
    drop = lambda d: [{k: v for k, v in t.items() if k != "wall_s"} for t in d["trials"]]  # noqa: E731
    assert after["chosen"] == before["chosen"] and after["estimate"] == before["estimate"]
    assert drop(after) == drop(before)


def test_a_refit_head_closes_finetunings_gate_and_calibration_cross_fits(run, tmp_path):
    cfg = _copy(run, tmp_path, "finetune.min_train_images=0", "serve.min_calibration=0")
    for name in ("finetune", "scratch", "select"):
        get(name).function(cfg)
    decision = _read(cfg, "finetune", "decision.json")
    assert not decision["finetuned"] and "refit on train+val" in decision["reason"]
    result = get("calibrate").function(cfg)
    assert "cross-fitted over train+val" in result.source  # the val split trained the head


def test_large_data_searches_on_the_validation_split_and_keeps_early_stopping(run, tmp_path):
    cfg = _copy(run, tmp_path, "train_head.search.cv_max_images=10")
    get("train_head").function(cfg)
    m, s = _read(cfg, "train_head", "metrics.json"), _read(cfg, "train_head", "search.json")
    assert s["mode"] == "holdout" and "cv_max_images=10" in s["notes"][0] and s["refit_epochs"] is None
    assert not m["refit_on_train_val"] and m["val_estimate"] == "validation split"
