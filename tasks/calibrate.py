"""calibrate: the abstention rule (temperature, conformal set threshold, out-of-distribution gate) fitted
on held-out images of the selected model: its validation split or, for the head-only transfer model with
fewer than serve.min_calibration validation images or refit on train+val by train_head's search,
out-of-fold figures of train+val (heads and gates cross-fitted). The gate's constants (ood_gate.npz:
fitted on the training features, or on train+val after a cross-fit) go to export, which computes the
score in the graph; evaluate measures the rule on the test split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headstart.atomic import directory, write_bytes, write_json, write_text
from headstart.calibration import fit, fit_gate, gate_file_bytes, kept_interval, to_markdown
from headstart.config import Params
from headstart.models import load_model
from headstart.search import chosen_params
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
    refit = _inputs.read_json(cfg, "train_head", "metrics.json").get("refit_on_train_val", False)
    if model.kind == "head" and (len(val) < s.min_calibration or refit):  # refit: the head saw val
        logits, y, source, scores, gate, why = _crossfit(cfg, model, frame)
    else:
        p = cfg.train_head
        logits = model.logits(paths, val["sha256"], p.runtime, cfg.project.cache_dir, p.extract_batch_size)
        y, source = _labels(model, val), f"validation split ({model.kind} model)"
        if len(val) < s.min_calibration:
            source += f"; fewer than serve.min_calibration={s.min_calibration}, no cross-fit for this kind"
        train, train_paths = _inputs.split_paths(cfg, frame, "train")
        gate, why = fit_gate(
            _features(cfg, model, train, train_paths), _labels(model, train), len(model.classes)
        )
        scores = None if gate is None else gate.score(_features(cfg, model, val, paths))
    rule, report = fit(logits, y, s.alpha, source, scores, s.ood_alpha, gate.k if gate else None)
    report["gate_fit"] = why  # what the constants were fitted on, or why the rule fell back
    b = cfg.promote.n_bootstrap, cfg.promote.confidence, cfg.project.seed  # promotion's bootstrap
    report["held_out"] = kept_interval(report["held_out"], *b)
    d = {"rule": rule.__dict__, "report": report}
    with directory(cfg.stage_dir("calibrate")) as out:
        write_json(out / "abstention.json", d)
        write_bytes(out / "ood_gate.npz", gate_file_bytes(gate if rule.ood else None, why))
        write_text(out / "summary.md", to_markdown(d))
    return CalibrateResult(source, report["n"], rule.temperature)


def _labels(model, rows) -> np.ndarray:
    return rows["label"].map(model.classes.index).to_numpy(np.int64)


def _features(cfg: Params, model, rows, paths) -> np.ndarray:
    p = cfg.train_head
    return model.features(paths, rows["sha256"], p.runtime, cfg.project.cache_dir, p.extract_batch_size)


def _crossfit(cfg: Params, model, frame):
    """Out-of-fold logits and gate scores over train+val (each image's from a head and a gate that
    never saw it), and the gate shipped: fitted on all of train+val."""
    from headstart.training import out_of_fold_logits, stratified_folds

    rows = frame[frame["split"].isin(["train", "val"])].reset_index(drop=True)
    k, seed = len(model.classes), cfg.project.seed
    x, y = _features(cfg, model, rows, [cfg.prepare.data_dir / x for x in rows["path"]]), _labels(model, rows)
    # each fold's head trained as the shipped one was
    p, epochs = chosen_params(cfg.train_head, _inputs.read_json(cfg, "train_head", "metrics.json"))
    logits = out_of_fold_logits(x, y, k, p, cfg.serve.folds, epochs, seed)
    which, scores = stratified_folds(y, cfg.serve.folds, seed), np.zeros(len(y))  # out_of_fold_logits' folds
    gate, why = fit_gate(x, y, k)
    for fold in range(cfg.serve.folds if gate is not None else 0):
        held = which == fold
        if not held.any():
            continue
        fold_gate, fold_why = fit_gate(x[~held], y[~held], k)
        if fold_gate is None:
            gate, why = None, f"fold {fold} of the cross-fit: {fold_why}"
            break
        scores[held] = fold_gate.score(x[held])
    source = f"out-of-fold logits of {cfg.serve.folds} heads cross-fitted over train+val"
    why += "; out-of-fold gate scores for the threshold" if gate is not None else ""
    return logits, y, source, None if gate is None else scores, gate, why
