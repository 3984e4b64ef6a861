"""Classification metrics and their plots, from labels and predictions (numpy only, plus matplotlib), and
the percentile bootstrap that puts a confidence interval on an accuracy (promotion's paired one too)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

_BOOTSTRAP_CELLS = 1_000_000  # resamples x images per batch: a peak near 70 MB at any data size


def percentile_bootstrap(
    samples: tuple[np.ndarray, ...], statistic: Callable, n: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile CI of `statistic(*samples, axis)` from resampling images (rows kept together across
    `samples`), seeded and in batches of bounded memory. One image: no spread, the point itself.

    Follows scipy.stats.bootstrap's percentile method (BSD licence) step for step, for the call
    `bootstrap(samples, statistic, paired=True, vectorized=True, n_resamples=n, batch=..., method=
    "percentile", rng=default_rng(seed))`: the same draws, statistic calls and quantiles, so the same
    numbers bit for bit, without loading scipy.stats (hundreds of modules, tens of MB) into the flow's
    process, which keeps every module a stage imports until export, its memory peak."""
    samples = tuple(np.asarray(s) for s in samples)
    size = len(samples[0])
    if size < 2:
        point = float(statistic(*samples, axis=-1)) if size else float("nan")
        return point, point
    if any(len(s) != size for s in samples):
        raise ValueError("paired samples need the same number of rows")
    if n < 1:
        raise ValueError("the bootstrap needs at least one resample")
    rng, batch = np.random.default_rng(seed), max(1, _BOOTSTRAP_CELLS // size)
    theta = []
    for k in range(0, n, batch):
        # paired: scipy draws one (resamples, images) index matrix and indexes every sample with it
        rows = rng.integers(0, size, (min(batch, n - k), size), dtype=np.int64)
        theta.append(statistic(*(s[rows] for s in samples), axis=-1))
    theta = np.concatenate(theta, axis=-1)
    alpha = np.asarray((1 - confidence) / 2, dtype=theta.dtype)
    low, high = _linear_quantiles(theta, np.stack((alpha, 1 - alpha)))
    if np.isnan(low) or np.isnan(high):
        warnings.warn(
            "the bootstrap interval is NaN: the statistic gave NaN on a resample", RuntimeWarning, 2
        )
    return float(low), float(high)


def _linear_quantiles(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """scipy.stats.quantile(x, p) of a 1-d x, method 'linear' (Hyndman & Fan 7), in its arithmetic
    (it differs from np.quantile's in the last bits): NaN in x, or p outside [0, 1], gives NaN."""
    y, size = np.sort(x), np.asarray([len(x)], dtype=x.dtype)
    bad = (p > 1) | (p < 0) | np.isnan(p)
    p = np.where(bad, 0.5, p)
    jg = p * size + (1 - p)
    jp1 = jg // 1
    j = jp1 - 1
    g = jg % 1
    g[j < 0] = 0
    j, jp1 = np.clip(j, 0.0, size - 1), np.clip(jp1, 0.0, size - 1)
    out = (1 - g) * y[j.astype(np.int64)] + g * y[jp1.astype(np.int64)]
    out[bad | np.isnan(y.max())] = np.nan
    return out


def accuracy_interval(
    correct: np.ndarray, n_bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict:
    """An accuracy with its percentile bootstrap CI over the images (`correct`: one bool per image).
    No images: every figure None (nothing was measured)."""
    hit = np.asarray(correct, dtype=np.float64)
    if not len(hit):
        return {"accuracy": None, "ci_low": None, "ci_high": None, "confidence": confidence, "n": 0}
    low, high = percentile_bootstrap((hit,), lambda a, axis: a.mean(axis), n_bootstrap, confidence, seed)
    return {
        "accuracy": float(hit.mean()),
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "n": len(hit),
    }


def counted(k: int, n: int) -> np.ndarray:
    """k correct of n images as a correctness vector, for a report that kept only the counts: the
    bootstrap's distribution depends on the counts alone."""
    return np.arange(n) < k


def interval_fields(name: str, correct: np.ndarray, n_bootstrap: int, confidence: float, seed: int) -> dict:
    """`{name}_ci: [low, high]` and `ci_confidence` for a report beside its `name` figure (register
    logs each `*_ci` as `*_ci_low` / `*_ci_high` metrics); `{name}_ci` None when no image counted."""
    a = accuracy_interval(correct, n_bootstrap, confidence, seed)
    ci = None if a["n"] == 0 else [round(a["ci_low"], 6), round(a["ci_high"], 6)]
    return {f"{name}_ci": ci, "ci_confidence": confidence}


def ci_metrics(report: dict, prefix: str = "") -> dict[str, float]:
    """Every `*_ci: [low, high]` of a report as flat `{prefix}*_ci_low` / `_ci_high` metrics (MLflow)."""
    out = {}
    for key, ci in report.items():
        if key.endswith("_ci") and isinstance(ci, list | tuple) and len(ci) == 2:
            out |= {f"{prefix}{key}_low": float(ci[0]), f"{prefix}{key}_high": float(ci[1])}
    return out


def ci_text(ci: list | tuple | None, confidence: float, percent: bool = False) -> str:
    """`(95% CI 0.7514-0.8595)`, or '' when there is no interval: for summaries."""
    if not ci:
        return ""
    low, high = (f"{100 * v:.1f}" if percent else f"{v:.4f}" for v in ci)
    return f" ({confidence:.0%} CI {low}-{high}{'%' if percent else ''})"


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """Rows are true classes, columns predicted."""
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, the majority-class rate, macro-F1 and per-class precision/recall/F1/support, with the
    confusion matrix."""
    cm = confusion(y_true, y_pred, len(classes))
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "majority_rate": float(cm.sum(1).max() / max(cm.sum(), 1)),  # always answering the largest class
        "macro_f1": float(f1.mean()),
        "n": int(cm.sum()),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(cm[i].sum()),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
    }


KIND_NAMES = {"head": "head-only", "finetuned": "fine-tuned", "scratch": "from-scratch"}


def metrics_markdown(m: dict, classes: list[str], kind: str) -> str:
    """The test metrics for a Prefect artifact: accuracy, macro-F1, per class, the confusion matrix;
    `kind` is the model's (head, finetuned, scratch)."""
    lines = [
        f"# Test metrics ({KIND_NAMES.get(kind, kind)} model, {m['n']} images)",
        "",
        f"Accuracy {m['accuracy']:.4f}{ci_text(m.get('accuracy_ci'), m.get('ci_confidence', 0.95))}, "
        f"macro-F1 {m['macro_f1']:.4f}.",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
        *[
            f"| {c} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |"
            for c, v in m["per_class"].items()
        ],
        "",
        "| actual \\ predicted | " + " | ".join(classes) + " |",
        "|---|" + "---|" * len(classes),
        *[
            f"| {c} | " + " | ".join(map(str, row)) + " |"
            for c, row in zip(classes, m["confusion_matrix"], strict=True)
        ],
    ]
    return "\n".join(lines) + "\n"
