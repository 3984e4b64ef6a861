"""backbone: under train_head.backbone `auto`, rank the candidate backbones on a bounded sample of
train+val by LogME (and, on small data, a head's cross-validated accuracy) and choose one; a named
backbone is recorded as fixed, extracting nothing. The features go to the shared cache, so the chosen
backbone's later passes read them."""

from __future__ import annotations

import time
from dataclasses import dataclass

from headstart import HeadstartError
from headstart.atomic import directory, write_json, write_text
from headstart.backbones import load_backbone
from headstart.config import AUTO, Candidate, Params, TrainHeadParams
from headstart.features import Features
from headstart.ranking import cv_fields, decide, fixed, labels_of, ranking_sample, summary_line, to_markdown
from headstart.search import Folds, cross_validate, plan_folds
from headstart.transferability import logme
from tasks import _inputs

DEFAULT = TrainHeadParams.model_fields["backbone"].default


@dataclass
class BackboneResult:
    chosen: str
    how: str
    line: str  # the run summary's


def backbone(cfg: Params) -> BackboneResult:
    start, th = time.perf_counter(), cfg.train_head
    decision = fixed(th.backbone, th.weights, th.weights_sha256) if th.backbone != AUTO else _rank(cfg)
    decision["wall_s"] = round(time.perf_counter() - start, 2)
    with directory(cfg.stage_dir("backbone")) as out:
        write_json(out / "decision.json", decision)
        write_text(out / "summary.md", to_markdown(decision))
    return BackboneResult(decision["chosen"], decision["how"], summary_line(decision))


def _rank(cfg: Params) -> dict:
    frame = _inputs.manifest(cfg)
    classes = sorted(frame["label"].unique())
    pool = frame[frame["split"].isin(["train", "val"])]
    rows = ranking_sample(pool, cfg.backbone.max_images)
    y = labels_of(rows, classes)
    folds, how_scored = _folds(cfg, rows, y, len(pool))
    scored = [_score(cfg, c, rows, y, folds, len(classes)) for c in cfg.backbone.candidates]
    name, how, reason = decide(scored, small=folds is not None, default=DEFAULT)
    pick = next((c for c in cfg.backbone.candidates if c.name == name), Candidate(name=name))
    return {
        **fixed(pick.name, pick.weights, pick.weights_sha256, reason),
        "how": how,
        "candidates": scored,
        "n_images": len(rows),
        "n_train_val": len(pool),
        "folds": how_scored,
    }


def _folds(cfg: Params, rows, y, n_pool: int) -> tuple[Folds | None, str]:
    """The sample's folds when train+val is small (the head search's threshold), with how the
    candidates are scored; None (LogME alone) on larger data or where the sample cannot be folded."""
    sp = cfg.train_head.search
    if n_pool >= sp.cv_max_images:
        return None, f"LogME alone: {n_pool} train+val images >= train_head.search.cv_max_images"
    n_train = int((rows["split"] == "train").sum())
    folds = plan_folds(y[:n_train], y[n_train:], sp, cfg.project.seed)
    if folds.mode != "cv":  # a class with one sampled image: no accuracy worth ranking by
        return None, f"LogME alone: {folds.note}"
    return folds, folds.describe() + (f" ({folds.note})" if folds.note else "")


def _score(cfg: Params, c: Candidate, rows, y, folds: Folds | None, num_classes: int) -> dict:
    """One candidate's LogME (and CV accuracy) on the sample, its extraction cost; or why it was
    skipped. A candidate that fails (missing weights, a model the runtime cannot run) never stops the
    others."""
    th, start = cfg.train_head, time.perf_counter()
    paths = [cfg.prepare.data_dir / p for p in rows["path"]]
    try:
        model = load_backbone(c.name, c.weights, c.weights_sha256)
        features = Features(model, th.runtime, cfg.project.cache_dir, th.extract_batch_size)
        x, computed = features(paths, list(rows["sha256"]), desc=f"features ({c.name})")
    except Exception as exc:  # any failure of one candidate is recorded, not raised
        return {"name": c.name, "skipped": _why(exc)}
    extract_s = time.perf_counter() - start
    estimate = None if folds is None else cross_validate(x, y, folds, num_classes, th, cfg.project.seed)
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
