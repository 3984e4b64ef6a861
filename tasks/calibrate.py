"""calibrate: the abstention rule (temperature, conformal set threshold, energy gate) fitted on held-out
logits of the selected model: its validation split or, for the head-only transfer model with fewer
than serve.min_calibration validation images, out-of-fold logits of heads cross-fitted over train+val.
export ships the rule in every ONNX file; evaluate measures it on the test split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headstart.atomic import directory, write_json, write_text
from headstart.calibration import fit, to_markdown
from headstart.config import Params
from headstart.models import load_model
from tasks import _inputs


@dataclass
class CalibrateResult:
    source: str
    n: int
    temperature: float


def calibrate(cfg: Params) -> CalibrateResult:
    model = load_model(_inputs.stage_file(cfg, "select", "model.pt"))
    frame, s = _inputs.manifest(cfg), cfg.serve
    val, paths = _inputs.split_paths(cfg, frame, "val")
    if len(val) < s.min_calibration and model.kind == "head":
        logits, y, source = _crossfit(cfg, model, frame)
    else:
        p = cfg.train_head
        logits = model.logits(paths, val["sha256"], p.runtime, cfg.project.cache_dir, p.extract_batch_size)
        y, source = val["label"].map(model.classes.index).to_numpy(), f"validation split ({model.kind} model)"
        if len(val) < s.min_calibration:
            source += f"; fewer than serve.min_calibration={s.min_calibration}, no cross-fit for this kind"
    rule, report = fit(logits, y, s.alpha, source)
    d = {"rule": rule.__dict__, "report": report}
    with directory(cfg.stage_dir("calibrate")) as out:
        write_json(out / "abstention.json", d)
        write_text(out / "summary.md", to_markdown(d))
    return CalibrateResult(source, report["n"], rule.temperature)


def _crossfit(cfg: Params, model, frame) -> tuple[np.ndarray, np.ndarray, str]:
    from headstart.features import Features
    from headstart.training import out_of_fold_logits

    rows = frame[frame["split"].isin(["train", "val"])].reset_index(drop=True)
    paths, p = [cfg.prepare.data_dir / x for x in rows["path"]], cfg.train_head
    x, _ = Features(model.backbone, p.runtime, cfg.project.cache_dir, p.extract_batch_size)(
        paths, list(rows["sha256"]), desc="features (calibrate)"
    )
    y = rows["label"].map(model.classes.index).to_numpy(np.int64)
    epochs = _inputs.read_json(cfg, "train_head", "metrics.json")["best_epoch"]
    logits = out_of_fold_logits(x, y, len(model.classes), p, cfg.serve.folds, epochs, cfg.project.seed)
    return logits, y, f"out-of-fold logits of {cfg.serve.folds} heads cross-fitted over train+val"
