"""evaluate: test-set metrics of the selected model, a confusion matrix (PNG and DVC plot data), and,
when a from-scratch model trained beside the transfer one, the transfer gain: both on the same test
images, the accuracy difference with a paired bootstrap CI and McNemar's test, each one's training
time and size. Beside the test accuracy, calibrate's held-out one (out-of-fold on few images), and
the gate: the accuracy the gates use must beat the majority-class rate with confidence, or the run
ends here with `no signal` (headstart.promotion.learned_something)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from headstart import HeadstartError
from headstart.atomic import directory, write_bytes, write_json, write_text
from headstart.calibration import (
    apply,
    kept_interval,
    read_gate,
    rule_in,
    selective,
    selective_line,
    softmax,
)
from headstart.config import Params
from headstart.metrics import classification_metrics, interval_fields, metrics_markdown
from headstart.models import far_out_abstention, load_model
from headstart.plots import drawn
from headstart.promotion import NoSignal, estimate_markdown, honest_estimate
from headstart.selection import gain_line, gain_on_test
from tasks import _inputs


@dataclass
class EvaluateResult:
    accuracy: float
    macro_f1: float
    n_test: int
    model_kind: str = "head"
    transfer_gain: dict | None = None
    abstention: dict | None = None  # the shipped rule on the test split (calibration.selective)
    accuracy_ci: list[float] | None = None  # percentile bootstrap over the test images
    ci_confidence: float = 0.95
    estimate: str = "test"  # which accuracy the gates and promotion use: test or held_out
    estimates: dict | None = None  # each with its n, CI and majority-class rate
    signal: str = ""  # the "learned something" test in words


def evaluate(cfg: Params) -> EvaluateResult:
    model = load_model(_inputs.stage_file(cfg, "select", "model.pt"))
    rows, paths = _inputs.split_paths(cfg, _inputs.manifest(cfg), "test")
    if rows.empty:
        raise HeadstartError("the test split is empty; add images or raise prepare.test_fraction")
    logits = _probabilities(cfg, model, rows, paths, "logits")
    probs, y_true = softmax(logits), rows["label"].map(model.classes.index).to_numpy()
    calibrated = _inputs.read_json(cfg, "calibrate", "abstention.json")  # the rule and its held-out report
    rule = rule_in(calibrated, cfg.stage_dir("calibrate") / "abstention.json")
    gate = read_gate(_inputs.stage_file(cfg, "calibrate", "ood_gate.npz")) if rule.ood else None
    score = None if gate is None else gate.score(_probabilities(cfg, model, rows, paths, "features"))
    b = cfg.promote.n_bootstrap, cfg.promote.confidence, cfg.project.seed  # every CI: promotion's bootstrap
    kept = kept_interval(selective(rule, logits, y_true, score), *b)  # the shipped rule on the test split
    kept["far_out"] = far_out_abstention(model, rule, cfg.project.cache_dir, gate)  # noise, flat colours
    y_pred = probs.argmax(1)
    m = classification_metrics(y_true, y_pred, model.classes)
    m |= interval_fields("accuracy", y_pred == y_true, *b)
    e = cfg.evaluate
    estimates, signal = honest_estimate(m, calibrated["report"], e.min_test_images, e.signal_confidence, b)
    gain = _transfer_gain(cfg, rows, paths, probs)
    predictions = pd.DataFrame(
        {
            "path": rows["path"],
            "actual": rows["label"],
            "predicted": [model.classes[i] for i in y_pred],
            "confidence": probs.max(1).round(6),
            "abstained": [r or "" for r in apply(rule, logits, score).reasons],  # the shipped rule's reason
        }
    )
    metrics = {k: v for k, v in m.items() if k != "confusion_matrix"}
    metrics.update(model_kind=model.kind, transfer_gain=gain, abstention=kept, signal=signal, **estimates)
    summary = metrics_markdown(m, model.classes, model.kind) + f"\nTransfer gain: {gain_line(gain)}\n"
    summary += f"\nAbstention (test split): {selective_line(kept)}\n"
    summary += f"\n{estimate_markdown(estimates, signal)}"
    with directory(cfg.stage_dir("evaluate")) as out:
        write_json(out / "metrics.json", metrics)
        write_text(out / "summary.md", summary)
        write_json(out / "confusion.json", {"classes": model.classes, "matrix": m["confusion_matrix"]})
        cm, title = np.array(m["confusion_matrix"]), "test confusion matrix"
        write_bytes(out / "confusion.png", drawn("confusion_matrix", cm, model.classes, title))
        predictions.to_csv(out / "predictions.csv", index=False)
        if not signal["passed"]:  # the gate: nothing that learned nothing is exported or registered
            raise NoSignal(f"no signal: {signal['line']}; the model is not exported or registered")
    return EvaluateResult(
        m["accuracy"],
        m["macro_f1"],
        m["n"],
        model.kind,
        gain,
        kept,
        m["accuracy_ci"],
        m["ci_confidence"],
        estimates["estimate"],
        estimates["estimates"],
        signal["line"],
    )


def _probabilities(cfg: Params, model, rows, paths, what: str = "probabilities") -> np.ndarray:
    e = cfg.evaluate
    return getattr(model, what)(
        paths, rows["sha256"], cfg.train_head.runtime, cfg.project.cache_dir, e.batch_size
    )


def _transfer_gain(cfg: Params, rows, paths, chosen_probs: np.ndarray) -> dict:
    """Transfer vs scratch on the test images, or why it was not measured."""
    sel = _inputs.read_json(cfg, "select", "decision.json")
    candidates = {c["name"]: c for c in sel["candidates"]}
    if "scratch" not in candidates:
        return {"measured": False, "why_not": f"no from-scratch model ({sel['scratch_reason']})"}
    models = {n: load_model(_inputs.stage_file(cfg, *f)) for n, f in _inputs.MODEL_FILES.items()}
    probs = {
        n: chosen_probs if n == sel["chosen"] else _probabilities(cfg, m, rows, paths)
        for n, m in models.items()
    }
    p = cfg.promote
    y = rows["label"].to_numpy()
    return gain_on_test(y, models, probs, candidates, p.n_bootstrap, p.confidence, cfg.project.seed)
