"""train_head: a new head on the frozen backbone's cached features, early-stopped on validation loss."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from headstart import HeadstartError
from headstart.atomic import directory, write_json
from headstart.config import Params
from headstart.features import Features
from headstart.tracking import curve_logger
from headstart.training import fit_head, proven_frozen, save_model
from tasks import _backbone, _inputs


@dataclass
class TrainHeadResult:
    best_epoch: int
    val_accuracy: float
    features_computed: int
    features_cached: int
    extract_images_per_s: float | None


def train_head(cfg: Params) -> TrainHeadResult:
    start, p, frame, seed = time.perf_counter(), cfg.train_head, _inputs.manifest(cfg), cfg.project.seed
    classes = sorted(frame["label"].unique())
    backbone = _backbone.load(cfg)
    features = Features(backbone, p.runtime, cfg.project.cache_dir, p.extract_batch_size)
    train, val = (_inputs.split_paths(cfg, frame, s) for s in ("train", "val"))
    if train[0].empty:
        raise HeadstartError("the training split is empty; add images or lower the fractions")
    with proven_frozen(backbone.model, [], "train_head") as frozen:  # the whole backbone is frozen here
        (xt, views, xv), extracted = features.for_training(train, val, p.augment_views, seed)
        yt, yv = (rows["label"].map(classes.index).to_numpy(np.int64) for rows, _ in (train, val))
        live = curve_logger(cfg, "train_head")
        head, history, best_epoch = fit_head(
            xt, yt, xv, yv, len(classes), p, seed, views=views, on_epoch=live
        )
    best = history[best_epoch - 1]
    n_features = len(yt) * (1 + p.augment_views) + len(yv)
    metrics = {
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        **{k: best[k] for k in ("train_loss", "val_loss", "val_accuracy")},
        "n_train": len(yt),
        "n_val": len(yv),
        "features_computed": extracted.computed,
        "augment_views": p.augment_views,
        "class_balance": p.class_balance,
        "features_cached": n_features - extracted.computed,
        "extract_images_per_s": extracted.rate,
        "runtime": features.runtime,
        "frozen_check": frozen,
        "wall_s": round(time.perf_counter() - start, 2),  # features included: transfer's training cost
    }
    with directory(cfg.stage_dir("train_head")) as out:
        save_model(out / "model.pt", backbone, head, classes, p)
        write_json(out / "history.json", history)
        write_json(out / "metrics.json", metrics)
    return TrainHeadResult(
        best_epoch, best["val_accuracy"], extracted.computed, metrics["features_cached"], extracted.rate
    )
