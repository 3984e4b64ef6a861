"""train_head: a new head on the frozen backbone's cached features, its settings chosen by a
cross-validated search (headstart.search): on small data refit on train+val for the folds' epochs,
on large data early-stopped on the validation split."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from headstart import HeadstartError
from headstart.atomic import directory, write_json
from headstart.config import Params
from headstart.features import Extracted, Features
from headstart.search import train_best_head
from headstart.tracking import curve_logger
from headstart.training import proven_frozen_backbone, save_model
from tasks import _backbone, _inputs


@dataclass
class TrainHeadResult:
    best_epoch: int
    val_accuracy: float
    features_computed: int
    features_cached: int
    extract_images_per_s: float | None
    search: str  # how the head's settings were chosen (the run summary's `head` line)


def train_head(cfg: Params) -> TrainHeadResult:
    start, p, frame, seed = time.perf_counter(), cfg.train_head, _inputs.manifest(cfg), cfg.project.seed
    classes = sorted(frame["label"].unique())
    backbone = _backbone.load(cfg)
    features = Features(backbone, p.runtime, cfg.project.cache_dir, p.extract_batch_size, runner=cfg.engine)
    train, val = (_inputs.split_paths(cfg, frame, s) for s in ("train", "val"))
    if train[0].empty:
        raise HeadstartError("the training split is empty; add images or lower the fractions")
    # the whole backbone is frozen here; a warm run (features, ONNX graph cached) never builds it
    with proven_frozen_backbone(backbone, "train_head") as frozen:
        (xt, views, xv), extracted = features.for_training(train, val, p.augment_views, seed)
        yt, yv = (rows["label"].map(classes.index).to_numpy(np.int64) for rows, _ in (train, val))
        computed = []

        def val_views() -> np.ndarray:  # val rows train in CV folds: their views too
            v, n = features.views(val[1], list(val[0]["sha256"]), p.augment_views, seed)
            computed.append(n)
            return v

        head, history, best_epoch, search = train_best_head(
            xt, yt, xv, yv, views, len(classes), p, seed, val_views, curve_logger(cfg, "train_head")
        )
        extracted = Extracted(extracted.computed + sum(computed), extracted.rate)
        chosen = search.final_params()
    best = history[best_epoch - 1]
    n_features = len(yt) * (1 + p.augment_views) + len(yv)
    metrics = {
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_loss": best["train_loss"],
        **search.held_out(best, len(yt), len(yv)),
        "n_train": len(yt),
        "n_val": len(yv),
        "features_computed": extracted.computed,
        "augment_views": chosen.augment_views,
        "class_balance": chosen.class_balance,
        "features_cached": n_features - extracted.computed,
        "extract_images_per_s": extracted.rate,
        "runtime": features.runtime,
        "frozen_check": frozen,
        "wall_s": round(time.perf_counter() - start, 2),  # features included: transfer's training cost
    }
    with directory(cfg.stage_dir("train_head")) as out:
        save_model(out / "model.pt", backbone, head, classes, chosen)
        write_json(out / "history.json", history)
        write_json(out / "metrics.json", metrics)
        write_json(out / "search.json", search.to_json())
    return TrainHeadResult(
        best_epoch,
        metrics["val_accuracy"],
        extracted.computed,
        metrics["features_cached"],
        extracted.rate,
        search.line(),
    )
