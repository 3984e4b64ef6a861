"""Promotion by evidence: the challenger against the champion on images neither has seen.

On a few hundred test images one accuracy figure is noise, so "newer and higher" is no rule. Both
models predict the same images, and only images that neither version trained or validated on count
(a changed seed or fraction would otherwise put the champion's training images into the test split).
A paired bootstrap of the accuracy difference gives a confidence interval; the challenger is promoted
when its lower bound clears -margin (not worse, with confidence) against the champion and against the
best champion so far (alias `best`), so a chain of slightly worse versions cannot drift down
unnoticed. McNemar's exact test on the discordant pairs is reported beside it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from headstart import GateFailed, HeadstartError
from headstart.config import PromoteParams
from headstart.metrics import ci_text, classification_metrics, counted, interval_fields, percentile_bootstrap

TRAINED_SPLITS = ("train", "val")  # what a version has seen: the rest of its manifest is fair evidence


@dataclass
class Predictions:
    """One registered version's top-1 predictions on the comparison images."""

    version: str
    classes: list[str]
    pred: np.ndarray  # index into classes, one per image


def evidence(rows, data_dir, versions: list[str], trained_on, top1, p: PromoteParams, seed: int) -> dict:
    """Comparisons of versions[0] with the champion (versions[1]) and `best` (versions[2], when another
    version holds it) on the current images none of them trained or validated on. `trained_on(v)` gives
    a version's train+val sha256s, `top1(v, paths)` its (classes, top-1 indices) through onnxruntime."""
    champion = versions[1]
    try:
        clean = clean_rows(rows, [trained_on(v) for v in versions])
        out = {"clean": {"n_images": len(clean), "n_current": len(rows), "versions": versions}}
        if note := too_few(len(clean), len(rows), versions, p):
            return {**out, "note": note}
        paths, labels = [data_dir / x for x in clean["path"]], list(clean["label"])
        new, *old = [Predictions(v, *top1(v, paths)) for v in versions]
        out["comparison"] = compare(labels, new, old[0], p, seed, "champion")
        out["best_comparison"] = compare(labels, new, old[1], p, seed, "best") if old[1:] else None
    except HeadstartError as exc:
        return {"note": f"cannot compare with champion v{champion}: {exc}"}
    return out


def gates(tags: Mapping[str, str], metrics: Mapping[str, float], p: PromoteParams) -> dict[str, dict]:
    """Each gate from what the version's own MLflow run recorded (its tags and metrics)."""
    accuracy = metrics.get("estimate_accuracy", metrics.get("test_accuracy"))
    which = tags.get("evaluate.estimate", "test")
    return {
        "validation": {
            "passed": tags.get("validate.success") == "true",
            "detail": f"validate.success={tags.get('validate.success', 'not recorded')}",
        },
        "domain": _domain_gate(tags, p),
        "export_parity": {
            "passed": tags.get("export.parity_passed") == "true",
            "detail": f"export.parity_passed={tags.get('export.parity_passed', 'not recorded')}",
        },
        "signal": {
            "passed": tags.get("evaluate.signal") == "true",
            "detail": tags.get("evaluate.signal_line", "no signal test recorded (registered before it)"),
        },
        "accuracy": {
            "passed": accuracy is not None and accuracy >= p.min_accuracy,
            "detail": f"{ESTIMATE_NAMES.get(which, which)} accuracy "
            f"{accuracy if accuracy is None else round(accuracy, 4)} (floor {p.min_accuracy})",
        },
    }


def _domain_gate(tags: Mapping[str, str], p: PromoteParams) -> dict:
    """The verdict judges the pretrained backbone's fit to the data. It does not apply to a model
    trained from scratch, and where a from-scratch model was trained and compared on validation,
    selection's evidence has answered it, whichever model won."""
    verdict, kind = tags.get("domain.verdict", "not recorded"), tags.get("select.kind")
    detail = f"verdict {verdict}; allowed {', '.join(p.allowed_verdicts)}"
    if verdict in p.allowed_verdicts:
        return {"passed": True, "detail": detail}
    if kind == "scratch":
        return {"passed": True, "detail": f"{detail}; the model was trained from scratch: not its backbone's"}
    if tags.get("scratch.trained") == "true":
        return {
            "passed": True,
            "detail": f"{detail}; a from-scratch model was trained and selection chose {kind}",
        }
    return {"passed": False, "detail": detail}


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exactly (log-space sum): scipy.stats.binomtest's one-sided
    `greater` p-value, without loading scipy.stats into the flow's process."""
    if k <= 0 or p >= 1.0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    i = np.arange(k, n + 1)
    lg = np.array([math.lgamma(v + 1) for v in range(n + 1)])
    log_pmf = lg[n] - lg[i] - lg[n - i] + i * math.log(p) + (n - i) * math.log1p(-p)
    return float(min(1.0, np.exp(log_pmf).sum()))


class NoSignal(GateFailed):
    """The model's accuracy does not beat always answering the largest class with confidence."""


ESTIMATE_NAMES = {"test": "test split", "held_out": "held-out (calibrate's)"}


def choose_estimate(test: dict, held_out: dict | None, min_test_images: int) -> str:
    """Which accuracy the gates and promotion use: the test split's from `min_test_images` images, or
    when it holds at least as many as the held-out set; else calibrate's held-out one (out-of-fold over
    train+val on few images), the larger sample of images the model was not fitted on."""
    if not held_out or not held_out.get("n") or held_out.get("accuracy") is None:
        return "test"
    return "test" if test["n"] >= min(min_test_images, held_out["n"]) else "held_out"


def learned_something(estimate: dict, confidence: float) -> dict:
    """Does the accuracy beat always answering the largest class? A one-sided exact binomial test of
    its correct count against the majority-class rate of the same images, at `confidence` (0: off)."""
    n, rate = estimate["n"], estimate["majority_rate"]
    k = round(estimate["accuracy"] * n)
    p = binomial_tail(k, n, rate)
    passed = confidence == 0.0 or p < 1.0 - confidence
    beats = "beats" if passed else "does not beat"
    line = (
        f"{estimate['name']} accuracy {estimate['accuracy']:.4f} ({k} of {n} images) {beats} always "
        f"answering the largest class ({rate:.4f}) with {confidence:.0%} confidence "
        f"(one-sided binomial p = {p:.3g})"
    )
    return {"passed": passed, "p_value": p, "majority_rate": rate, "confidence": confidence, "line": line}


def honest_estimate(
    test: dict, calibrated: dict, min_test_images: int, confidence: float, bootstrap: tuple
) -> tuple[dict, dict]:
    """Both accuracies, each with its n, CI and majority-class rate: the test split's and calibrate's
    held-out one (out-of-fold over train+val on few images); which one the gates use; and the
    "learned something" test of that one. `bootstrap`: (n_bootstrap, confidence, seed), promotion's."""
    h = calibrated.get("held_out") or {}
    held = None
    if h.get("n") and h.get("majority_rate") is not None:
        held = {k: h[k] for k in ("n", "accuracy", "majority_rate")} | {"source": calibrated["source"]}
        held |= interval_fields("accuracy", counted(round(h["accuracy"] * h["n"]), h["n"]), *bootstrap)
    both = {"test": {k: test[k] for k in ("n", "accuracy", "accuracy_ci", "majority_rate")}, "held_out": held}
    which = choose_estimate(both["test"], held, min_test_images)
    chosen = both[which] | {"name": ESTIMATE_NAMES[which]}
    out = {"estimate": which, "estimates": both}
    out |= {"estimate_accuracy": chosen["accuracy"], "estimate_accuracy_ci": chosen["accuracy_ci"]}
    return out, learned_something(chosen, confidence)


def estimate_markdown(e: dict, signal: dict) -> str:
    """The estimates side by side, which one the gates use, and the signal verdict."""
    rows = [
        f"| {ESTIMATE_NAMES[k]} | {v['accuracy']:.4f}{ci_text(v['accuracy_ci'], 0.95)} | {v['n']} | "
        f"{v['majority_rate']:.4f} | {'**yes**' if k == e['estimate'] else ''} |"
        for k, v in e["estimates"].items()
        if v
    ]
    head = (
        "| estimate | accuracy | images | largest class | gates and promotion use it |\n|---|---|---|---|---|"
    )
    verdict = "Learned something" if signal["passed"] else "NO SIGNAL"
    return f"## Accuracy estimates\n\n{head}\n" + "\n".join(rows) + f"\n\n{verdict}: {signal['line']}.\n"


def seen(manifest: pd.DataFrame) -> frozenset[str]:
    """The sha256s a version trained or validated on, from the manifest its run logged."""
    return frozenset(manifest.loc[manifest["split"].isin(TRAINED_SPLITS), "sha256"])


def clean_rows(rows: pd.DataFrame, seen_by: Iterable[frozenset[str]]) -> pd.DataFrame:
    """The images whose content no compared version has seen: the only fair evidence between them."""
    excluded = frozenset().union(*seen_by)
    return rows[~rows["sha256"].isin(excluded)].reset_index(drop=True)


def too_few(n_clean: int, n_rows: int, versions: Sequence[str], p: PromoteParams) -> str:
    """Why a comparison on n_clean images is refused, or '' when there are enough."""
    if n_clean >= p.min_clean_images:
        return ""
    return (
        f"too few clean images: {n_clean} of {n_rows} current images were seen by none of "
        f"{', '.join(f'v{v}' for v in versions)} in training or validation "
        f"(promote.min_clean_images={p.min_clean_images}); add new images to compare on"
    )


def compare(
    labels: Sequence[str],
    new: Predictions,
    old: Predictions,
    p: PromoteParams,
    seed: int,
    role: str = "champion",
) -> dict:
    """new vs old (the `role` alias's version) on the same images: the paired bootstrap, McNemar and
    both models' metrics; HeadstartError when their classes differ."""
    if sorted(new.classes) != sorted(old.classes):
        raise HeadstartError(f"v{old.version} predicts {old.classes}, v{new.version} predicts {new.classes}")
    classes = new.classes
    old_pred = np.array([classes.index(old.classes[i]) for i in old.pred], dtype=int)  # same names, any order
    y = np.array([classes.index(c) for c in labels], dtype=int)
    return {
        **paired_bootstrap(y, new.pred, old_pred, p.n_bootstrap, p.confidence, seed),
        "version_new": new.version,
        "version_old": old.version,
        "role": role,
        "mcnemar": mcnemar(y, new.pred, old_pred),
        "models": {
            f"v{new.version} (new)": {**classification_metrics(y, new.pred, classes), "classes": classes},
            f"v{old.version} ({role})": {**classification_metrics(y, old_pred, classes), "classes": classes},
        },
    }


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
    low, high = percentile_bootstrap(
        (right_new, right_old), lambda a, b, axis: (a - b).mean(axis), n, confidence, seed
    )
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
    from scipy.stats import binomtest

    y, pred_new, pred_old = map(np.asarray, (y, pred_new, pred_old))
    b = int(((pred_old == y) & (pred_new != y)).sum())
    c = int(((pred_old != y) & (pred_new == y)).sum())
    p = binomtest(c, b + c, 0.5).pvalue if b + c else 1.0
    return {"only_old_right": b, "only_new_right": c, "p_value": float(p)}


def decide(
    gates: dict[str, dict], comparison: dict | None, margin: float, note: str = "", best: dict | None = None
) -> tuple[bool, str]:
    """(promote?, reason). Every gate must pass; then no champion -> promote; else the CI's lower bound
    of new - champion must clear -margin, and so must that of new - best (the best champion so far,
    when another version holds it): steps each within the margin cannot add up to more than it. A
    comparison that could not be made never promotes."""
    failed = [name for name, g in gates.items() if not g["passed"]]
    if failed:
        return False, "gate failed: " + "; ".join(f"{n} ({gates[n]['detail']})" for n in failed)
    if comparison is None:
        return (False, note) if note else (True, "no champion yet: the first model that passes every gate")
    if comparison["ci_low"] < -margin:
        return False, f"could be worse: {_interval(comparison)}, lower bound < -{margin}"
    if best is not None and best["ci_low"] < -margin:
        return False, (
            f"drift: not worse than the champion, but against the best champion so far "
            f"v{best.get('version_old', '?')} {_interval(best)}, lower bound < -{margin} "
            "(promote.margin bounds the total loss of a chain of promotions)"
        )
    against_best = f"; against the best v{best.get('version_old', '?')}: {_interval(best)}" if best else ""
    return True, (
        f"not worse with {comparison['confidence']:.0%} confidence: {_interval(comparison)}, lower bound "
        f">= -{margin}{against_best}"
    )


def _interval(c: dict) -> str:
    return f"accuracy difference {c['difference']:+.4f}, CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"


def becomes_best(promoted: bool, comparison: dict | None, best: dict | None) -> bool:
    """A new champion takes alias `best` when it is at least as accurate as the best so far on the
    clean images they share (`best` None: the champion is the best); the first champion always."""
    if not promoted:
        return False
    reference = best if best is not None else comparison
    return reference is None or reference["difference"] >= 0


def version_tags(decision: dict) -> dict[str, str]:
    """The decision as model-version tags: what `promotion.*` records in the registry."""
    c, b = decision.get("comparison"), decision.get("best_comparison")
    tags = {
        "promotion.decision": "champion" if decision["promoted"] else "challenger",
        "promotion.reason": decision["reason"],
        "promotion.champion_before": decision["champion_version"] or "none",
        "promotion.best_before": decision.get("best_version") or "none",
        "promotion.gates": json.dumps({k: g["passed"] for k, g in decision["gates"].items()}),
    }
    if decision.get("clean"):
        tags["promotion.clean_images"] = str(decision["clean"]["n_images"])
    for prefix, cmp_ in (("promotion", c), ("promotion.best", b)):
        if cmp_:
            tags |= {
                f"{prefix}.ci_low": f"{cmp_['ci_low']:.4f}",
                f"{prefix}.ci_high": f"{cmp_['ci_high']:.4f}",
                f"{prefix}.difference": f"{cmp_['difference']:.4f}",
                f"{prefix}.mcnemar_p": f"{cmp_['mcnemar']['p_value']:.4g}",
            }
    return tags


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
    clean = decision.get("clean")
    if clean:
        lines += [
            "",
            f"Clean evidence: {clean['n_images']} of {clean['n_current']} current images were seen by "
            f"none of {', '.join(f'v{v}' for v in clean['versions'])} in training or validation.",
        ]
    for cmp_ in (decision.get("comparison"), decision.get("best_comparison")):
        if cmp_:
            lines += ["", _paragraph(cmp_)]
    if decision.get("comparison"):
        lines += _tables(decision["comparison"]["models"])
    return "\n".join(lines) + "\n"


def _paragraph(c: dict) -> str:
    mc = c["mcnemar"]
    return (
        f"Against the {c['role']} v{c['version_old']}, paired on {c['n_images']} images: accuracy "
        f"{c['accuracy_new']:.4f} (new) vs {c['accuracy_old']:.4f}, difference {c['difference']:+.4f}, "
        f"{c['confidence']:.0%} CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] ({c['n_bootstrap']} paired "
        f"bootstrap resamples); McNemar: {mc['only_new_right']} images only the new model gets right, "
        f"{mc['only_old_right']} only v{c['version_old']}, p = {mc['p_value']:.4g}."
    )


def _tables(models: dict) -> list[str]:
    names = list(models)
    classes = models[names[0]]["classes"]
    lines = ["", "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in ("accuracy", "macro_f1"):
        lines.append(f"| {key} | " + " | ".join(f"{models[n][key]:.4f}" for n in names) + " |")
    for c in classes:
        for key in ("precision", "recall", "f1"):
            lines.append(
                f"| {c} {key} | " + " | ".join(f"{models[n]['per_class'][c][key]:.4f}" for n in names) + " |"
            )
    for n in names:
        m = models[n]["confusion_matrix"]
        lines += ["", f"Confusion matrix, {n} (rows: actual, columns: predicted)", ""]
        lines += ["| | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
        lines += [
            f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(classes, m, strict=True)
        ]
    return lines
