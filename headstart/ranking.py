"""Backbone choice by transferability: which candidate's frozen features suit these labels best.

Every candidate sees the same bounded, class-stratified sample of train+val (the bound on extraction:
one pass of `max_images` per candidate), scored by LogME (headstart.transferability) and, on small data,
by the cross-validated accuracy of a head trained on those features. Small data ranks by that accuracy,
LogME breaking ties (few images make accuracies coarse); larger data by LogME alone. A candidate that
cannot be loaded or run is skipped with its reason; none left falls back to the default backbone.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from headstart import HeadstartError
from headstart.backbones import load_backbone
from headstart.config import Candidate, TrainHeadParams
from headstart.features import Features
from headstart.search import Folds, cross_validate
from headstart.transferability import logme

TIE = 6  # decimals of CV accuracy compared: closer accuracies tie, and LogME decides


def ranking_sample(rows: pd.DataFrame, max_images: int) -> pd.DataFrame:
    """At most `max_images` of `rows` (columns label, sha256, split), each class in proportion to its
    size (largest remainders round), the same rows every run: the first of each class in content-hash
    order. Training rows first, then the rest."""
    rows = rows.sort_values(["label", "sha256"])
    counts = rows["label"].value_counts().sort_index()
    share = counts * min(max_images, len(rows)) / len(rows)
    quota = np.floor(share).astype(int)
    extra = (
        (share - quota)
        .sort_values(ascending=False, kind="stable")
        .index[: int(round(share.sum())) - quota.sum()]
    )
    quota[extra] += 1
    picked = rows[rows.groupby("label").cumcount() < rows["label"].map(quota)]
    return picked.sort_values(["split", "label", "sha256"], key=_train_first).reset_index(drop=True)


def _train_first(column: pd.Series) -> pd.Series:
    return column.ne("train") if column.name == "split" else column


def fixed(name: str, weights, weights_sha256, why: str = "fixed by train_head.backbone") -> dict:
    """The decision when train_head.backbone names one: no ranking, nothing extracted."""
    chosen = {"name": name, "weights": _text(weights), "weights_sha256": weights_sha256}
    return {"chosen": name, "backbone": chosen, "how": "fixed", "reason": why, "candidates": []}


def decide(candidates: list[dict], small: bool, default: str) -> tuple[str, str, str]:
    """(chosen name, how: cv_accuracy, logme or fallback, why) from the scored candidates: entries with
    `logme` (and `cv_accuracy` on small data), or `skipped` with the reason."""
    ranked = [c for c in candidates if "skipped" not in c]
    if not ranked:
        why = "; ".join(f"{c['name']}: {c['skipped']}" for c in candidates)
        return default, "fallback", f"no candidate could be ranked ({why}); the default backbone {default}"
    by_cv = small and all(c.get("cv_accuracy") is not None for c in ranked)
    key = (lambda c: (round(c["cv_accuracy"], TIE), c["logme"])) if by_cv else (lambda c: c["logme"])
    best = max(ranked, key=key)  # max keeps the first of equals: the candidates' listed order
    others = ", ".join(_short(c, by_cv) for c in ranked if c is not best) or "no other candidate ranked"
    if by_cv:
        how = "cv_accuracy"
        tied = [c for c in ranked if round(c["cv_accuracy"], TIE) == round(best["cv_accuracy"], TIE)]
        tie = f"; tied with {len(tied) - 1} other(s), LogME decides" if len(tied) > 1 else ""
        why = f"highest CV accuracy {_cv(best)}, LogME {best['logme']:.3f}{tie} (others: {others})"
    else:
        how = "logme"
        why = f"highest LogME {best['logme']:.3f} (others: {others})"
    return best["name"], how, why


def _short(c: dict, by_cv: bool) -> str:
    return f"{c['name']} {c['cv_accuracy']:.3f}" if by_cv else f"{c['name']} {c['logme']:.3f}"


def _cv(c: dict) -> str:
    return f"{c['cv_accuracy']:.3f} +- {c['cv_accuracy_std']:.3f}"


def _text(value) -> str | None:
    return None if value is None else str(value)


def summary_line(d: dict) -> str:
    """One line for the run summary: the chosen backbone and how."""
    if d["how"] == "fixed":
        return f"{d['chosen']} (train_head.backbone)"
    if d["how"] == "fallback":
        return f"{d['chosen']} (auto fell back to the default: {d['reason']})"
    ranked = [c for c in d["candidates"] if "skipped" not in c]
    best = next(c for c in ranked if c["name"] == d["chosen"])
    metric = "cv_accuracy" if d["how"] == "cv_accuracy" else "logme"
    others = "; ".join(f"{c['name']} {c[metric]:.3f}" for c in ranked if c is not best)
    skipped = [c["name"] for c in d["candidates"] if "skipped" in c]
    score = f"CV accuracy {_cv(best)}" if metric == "cv_accuracy" else f"LogME {best['logme']:.3f}"
    return (
        f"{d['chosen']} (auto: {score} on {d['n_images']} images"
        f"{'; ' + others if others else ''}{'; skipped ' + ', '.join(skipped) if skipped else ''}; "
        f"ranking took {d['wall_s']:.0f} s)"
    )


def to_markdown(d: dict) -> str:
    """The decision for a Prefect artifact and the MLflow run: every candidate's scores and costs."""
    lines = [f"# Backbone: {d['chosen']}", "", f"{d['how']}: {d['reason']}", ""]
    if not d["candidates"]:
        return "\n".join(lines)
    lines += [
        f"Ranked on {d['n_images']} train+val images (a class-stratified sample, at most "
        f"backbone.max_images); scored by {d['folds']}; {d['wall_s']:.1f} s in all.",
        "",
        "| backbone | LogME | CV accuracy | features | computed | extraction s | scoring s | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in d["candidates"]:
        if "skipped" in c:
            lines.append(f"| {c['name']} | | | | | | | skipped: {c['skipped']} |")
            continue
        cv = _cv(c) if c.get("cv_accuracy") is not None else "n/a"
        mark = "chosen" if c["name"] == d["chosen"] else ""
        lines.append(
            f"| {c['name']} | {c['logme']:.4f} | {cv} | {c['num_features']} | {c['features_computed']} "
            f"| {c['extract_s']:.1f} | {c['score_s']:.1f} | {mark} |"
        )
    return "\n".join(lines) + "\n"


def cv_fields(estimate: dict | None) -> dict:
    """A candidate's cross-validation figures (search.cross_validate's estimate), or none."""
    if estimate is None:
        return {"cv_accuracy": None}
    keep = ("accuracy", "accuracy_std", "fold_accuracies")
    return {f"cv_{k}": estimate[k] for k in keep}


def labels_of(rows: pd.DataFrame, classes: list[str]) -> np.ndarray:
    return rows["label"].map(classes.index).to_numpy(np.int64)


def score(
    c: Candidate,
    paths,
    shas,
    y,
    folds: Folds | None,
    num_classes: int,
    th: TrainHeadParams,
    cache_dir,
    seed: int,
) -> dict:
    """One candidate's LogME (and CV accuracy) on the sample, its extraction cost; or why it was
    skipped. A candidate that fails (missing weights, a model the runtime cannot run) never stops the
    others."""
    start = time.perf_counter()
    try:
        model = load_backbone(c.name, c.weights, c.weights_sha256)
        features = Features(model, th.runtime, cache_dir, th.extract_batch_size)
        x, computed = features(paths, shas, desc=f"features ({c.name})")
    except Exception as exc:  # any failure of one candidate is recorded, not raised
        return {"name": c.name, "skipped": _why(exc)}
    extract_s = time.perf_counter() - start
    estimate = None if folds is None else cross_validate(x, y, folds, num_classes, th, seed)
    return {
        "name": c.name,
        "logme": round(logme(x, y), 6),
        **cv_fields(estimate),
        "n_images": len(y),
        "num_features": model.num_features,
        "features_computed": computed,
        "extract_s": round(extract_s, 2),
        "score_s": round(time.perf_counter() - start - extract_s, 2),
    }


def _why(exc: Exception) -> str:
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return text if isinstance(exc, HeadstartError) else f"{type(exc).__name__}: {text}"
