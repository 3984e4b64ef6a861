"""train_head: a new head on the frozen backbone's cached features, early-stopped on validation loss."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from headstart import HeadstartError
from headstart.atomic import directory, write_json
from headstart.backbones import load_backbone
from headstart.config import Params
from headstart.features import Features
from headstart.tracking import curve_logger
from headstart.training import changed, digest, fingerprint, fit_head, frozen_tensors, save_model
from tasks import _inputs


@dataclass
class TrainHeadResult:
    best_epoch: int
    val_accuracy: float
    features_computed: int
    features_cached: int
    extract_images_per_s: float | None


def train_head(cfg: Params) -> TrainHeadResult:
    p = cfg.train_head
    frame = _inputs.manifest(cfg)
    classes = sorted(frame["label"].unique())
    backbone = load_backbone(p.backbone, p.weights, p.weights_sha256)
    before = fingerprint(frozen_tensors(backbone.model, []))  # the whole backbone is frozen here
    features = Features(backbone, p.runtime, cfg.project.cache_dir, p.extract_batch_size)
    data, computed, seconds = {}, 0, 0.0
    for split in ("train", "val"):
        rows, paths = _inputs.split_paths(cfg, frame, split)
        if split == "train" and rows.empty:
            raise HeadstartError("the training split is empty; add images or lower the fractions")
        start = time.perf_counter()
        x, n = features(paths, list(rows["sha256"]), desc=f"features ({split})")
        computed, seconds = computed + n, seconds + (time.perf_counter() - start if n else 0.0)
        data[split] = (x, rows["label"].map(classes.index).to_numpy(np.int64))
        if split == "train":
            start = time.perf_counter()
            views, n = features.views(paths, list(rows["sha256"]), p.augment_views, cfg.project.seed)
            computed, seconds = computed + n, seconds + (time.perf_counter() - start if n else 0.0)
    head, history, best_epoch = fit_head(
        *data["train"],
        *data["val"],
        len(classes),
        p,
        cfg.project.seed,
        views=views,
        on_epoch=curve_logger(cfg, "train_head"),
    )
    after = fingerprint(frozen_tensors(backbone.model, []))
    if moved := changed(before, after):
        raise HeadstartError(
            f"train_head: frozen backbone tensors changed (e.g. {moved[:3]}); model not saved"
        )
    best = history[best_epoch - 1]
    rate = computed / seconds if computed else None
    metrics = {
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_loss": best["train_loss"],
        "val_loss": best["val_loss"],
        "val_accuracy": best["val_accuracy"],
        "n_train": len(data["train"][1]),
        "n_val": len(data["val"][1]),
        "features_computed": computed,
        "augment_views": p.augment_views,
        "class_balance": p.class_balance,
        "features_cached": len(data["train"][1]) * (1 + p.augment_views) + len(data["val"][1]) - computed,
        "extract_images_per_s": rate,
        "runtime": features.runtime,
        "frozen_check": {"tensors": len(after), "sha256": digest(after), "unchanged": True},
    }
    with directory(cfg.stage_dir("train_head")) as out:
        save_model(out / "model.pt", backbone, head, classes, p)
        write_json(out / "history.json", history)
        write_json(out / "metrics.json", metrics)
    return TrainHeadResult(best_epoch, best["val_accuracy"], computed, metrics["features_cached"], rate)
