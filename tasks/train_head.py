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
from headstart.training import fit_head, save_model
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
    head, history, best_epoch = fit_head(*data["train"], *data["val"], len(classes), p, cfg.project.seed)
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
        "features_cached": len(data["train"][1]) + len(data["val"][1]) - computed,
        "extract_images_per_s": rate,
        "runtime": features.runtime,
    }
    with directory(cfg.stage_dir("train_head")) as out:
        save_model(out / "model.pt", backbone, head, classes, p)
        write_json(out / "history.json", history)
        write_json(out / "metrics.json", metrics)
    return TrainHeadResult(best_epoch, best["val_accuracy"], computed, metrics["features_cached"], rate)
