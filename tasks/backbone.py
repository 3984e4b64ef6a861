"""backbone: under train_head.backbone `auto`, rank the candidate backbones on a bounded sample of
train+val by LogME (and, on small data, a head's cross-validated accuracy) and choose one; a named
backbone is recorded as fixed, extracting nothing. The features go to the shared cache, so the chosen
backbone's later passes read them."""

from __future__ import annotations

import time
from dataclasses import dataclass

from headstart.atomic import directory, write_json, write_text
from headstart.config import AUTO, Candidate, Params, TrainHeadParams
from headstart.ranking import decide, fixed, labels_of, ranking_sample, score, summary_line, to_markdown
from headstart.search import Folds, plan_folds
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
    paths, shas = [cfg.prepare.data_dir / p for p in rows["path"]], list(rows["sha256"])
    th, seed = cfg.train_head, cfg.project.seed
    scored = [
        score(c, paths, shas, y, folds, len(classes), th, cfg.project.cache_dir, seed)
        for c in cfg.backbone.candidates
    ]
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
