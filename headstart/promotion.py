"""Promotion by evidence: the challenger against the champion on the same test images.

On a few hundred test images one accuracy figure is noise, so "newer and higher" is no rule. Both
models predict the same images; a paired bootstrap of the accuracy difference gives a confidence
interval, and the challenger is promoted when its lower bound clears -margin (not worse, with
confidence). McNemar's exact test on the discordant pairs is reported beside it.
"""

from __future__ import annotations

import math

import numpy as np


def paired_bootstrap(
    y: np.ndarray,
    pred_new: np.ndarray,
    pred_old: np.ndarray,
    n: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Accuracy difference new - old with a percentile CI from resampling images (pairs kept)."""
    y, pred_new, pred_old = map(np.asarray, (y, pred_new, pred_old))
    right_new, right_old = (pred_new == y).astype(np.float64), (pred_old == y).astype(np.float64)
    diff = right_new - right_old
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n, len(y)))
    samples = diff[idx].mean(1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha])
    return {
        "accuracy_new": float(right_new.mean()),
        "accuracy_old": float(right_old.mean()),
        "difference": float(diff.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "confidence": confidence,
        "n_bootstrap": n,
        "n_images": int(len(y)),
    }


def mcnemar(y: np.ndarray, pred_new: np.ndarray, pred_old: np.ndarray) -> dict:
    """Exact two-sided McNemar test: b = only the old model right, c = only the new one right."""
    y, pred_new, pred_old = map(np.asarray, (y, pred_new, pred_old))
    b = int(((pred_old == y) & (pred_new != y)).sum())
    c = int(((pred_old != y) & (pred_new == y)).sum())
    m = b + c
    if m == 0:
        p = 1.0
    else:
        k = min(b, c)
        tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m
        p = min(1.0, 2 * tail)
    return {"only_old_right": b, "only_new_right": c, "p_value": float(p)}


def decide(
    gates: dict[str, dict], comparison: dict | None, margin: float, note: str = ""
) -> tuple[bool, str]:
    """(promote?, reason). Every gate must pass; then no champion -> promote; else the CI's lower
    bound must clear -margin; a comparison that could not be made never promotes."""
    failed = [name for name, g in gates.items() if not g["passed"]]
    if failed:
        return False, "gate failed: " + "; ".join(f"{n} ({gates[n]['detail']})" for n in failed)
    if comparison is None:
        return (False, note) if note else (True, "no champion yet: the first model that passes every gate")
    low = comparison["ci_low"]
    if low >= -margin:
        return True, (
            f"not worse with {comparison['confidence']:.0%} confidence: accuracy difference "
            f"{comparison['difference']:+.4f}, CI [{low:+.4f}, {comparison['ci_high']:+.4f}], lower bound "
            f">= -{margin}"
        )
    return False, (
        f"could be worse: accuracy difference {comparison['difference']:+.4f}, CI [{low:+.4f}, "
        f"{comparison['ci_high']:+.4f}], lower bound < -{margin}"
    )


def to_markdown(decision: dict) -> str:
    """The comparison side by side: metrics, per-class metrics, confusion matrices, the decision."""
    lines = [
        f"# Promotion: {decision['model_name']} v{decision['version']} -> "
        f"{'champion' if decision['promoted'] else 'challenger'}",
        "",
        decision["reason"],
        "",
        "| gate | passed | detail |",
        "|---|---|---|",
        *[
            f"| {n} | {'yes' if g['passed'] else 'NO'} | {g['detail']} |"
            for n, g in decision["gates"].items()
        ],
    ]
    cmp_, models = decision.get("comparison"), decision.get("models", {})
    if cmp_:
        mc = decision["mcnemar"]
        lines += [
            "",
            f"Paired on {cmp_['n_images']} test images: accuracy {cmp_['accuracy_new']:.4f} (new) vs "
            f"{cmp_['accuracy_old']:.4f} (champion v{decision['champion_version']}), difference "
            f"{cmp_['difference']:+.4f}, {cmp_['confidence']:.0%} CI "
            f"[{cmp_['ci_low']:+.4f}, {cmp_['ci_high']:+.4f}] ({cmp_['n_bootstrap']} paired bootstrap "
            f"resamples); McNemar: {mc['only_new_right']} images only the new model gets right, "
            f"{mc['only_old_right']} only the champion, p = {mc['p_value']:.4g}.",
        ]
    if models:
        names = list(models)
        classes = models[names[0]]["classes"]
        lines += ["", "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for key in ("accuracy", "macro_f1"):
            lines.append(f"| {key} | " + " | ".join(f"{models[n][key]:.4f}" for n in names) + " |")
        for c in classes:
            for key in ("precision", "recall", "f1"):
                lines.append(
                    f"| {c} {key} | "
                    + " | ".join(f"{models[n]['per_class'][c][key]:.4f}" for n in names)
                    + " |"
                )
        for n in names:
            m = models[n]["confusion_matrix"]
            lines += ["", f"Confusion matrix, {n} (rows: actual, columns: predicted)", ""]
            lines += ["| | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
            lines += [
                f"| {c} | " + " | ".join(str(v) for v in row) + " |"
                for c, row in zip(classes, m, strict=True)
            ]
    return "\n".join(lines) + "\n"
