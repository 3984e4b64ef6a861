"""Benchmark (not a test): the head's settings as given against train_head's search, on held-out images.

    python -m benchmarks.quality [--quick] [--datasets lfw digits-20 ...] [--seeds 3] [--cache DIR]
                                 [--markdown table.md] [--combine REPORT ...]

Test accuracy on the pipeline's own test split, per data set and seed, for three ways to train the
head, each through the function train_head calls (headstart.search.train_best_head) with params.yaml's
train_head section:
- default: train_head.search.trials=0, the settings in params.yaml, early-stopped on the val split;
- searched: params.yaml's search (Optuna trials scored by k-fold CV over train+val below
  cv_max_images, then a refit on both; on the val split above it);
- searched+views: the same with train_head.augment_views=2, so the search may train on flip/crop
  views; only on the sets up to the demo's size, where views are cheap and most likely to pay.
Data sets: elpv `defect` at the demo's size (400 per class, as `headstart data pull elpv --per-class
400`) and in full, elpv `type` in full, lfw (all 200) and a 10-class few-shot set (scikit-learn's 8x8
digits, the first 20 files per class). Splits as prepare makes them (assign_splits with params.yaml's
fractions and the seed); seeds 0, 1, 2 move the splits and the heads' initialisation. Features come
from the frozen efficientnet_lite0 (onnxruntime) through one feature cache (--cache): each image is
extracted once across seeds and sets, reported apart as `feature_extraction`; a method's `head_s` is
the search and the final fit alone, its `views_s` the extraction of its augmented views. The heads
train on one torch thread, as everywhere (training.fit_head).
Each point records the test accuracy with its 95% bootstrap CI, macro-F1, the search's CV estimate and
the settings it chose. Prints one JSON report; --markdown writes the README's table. --datasets runs
some sets (e.g. one per process) and --combine assembles their reports. --quick (1 seed, 6 trials, lfw
and digits-20 unless --datasets says otherwise) is a smoke run of a few minutes, not the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.transfer import digits_folder, materialise
from headstart.backbones import load_backbone
from headstart.config import TrainHeadParams, load_params
from headstart.data.builtin import pull
from headstart.data.manifest import assign_splits, scan
from headstart.features import Features
from headstart.metrics import accuracy_interval, classification_metrics
from headstart.search import SEARCHED, train_best_head

DATASETS = ("elpv-defect-400", "elpv-defect", "elpv-type", "lfw", "digits-20")
VIEW_SETS = ("elpv-defect-400", "lfw", "digits-20")  # up to the demo's size
METHODS = ("default", "searched", "searched+views")
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@dataclass(frozen=True)
class Settings:
    seeds: int = 3
    views: int = 2  # augment_views for searched+views
    trials: int | None = None  # None: params.yaml's train_head.search.trials


FULL = Settings()
QUICK = Settings(seeds=1, trials=6)


def dataset_folder(name: str, work: Path) -> Path:
    """The image folder of one of DATASETS under work/."""
    out = work / name
    if name == "elpv-defect-400":
        pull("elpv", out, task="defect", per_class=400)
    elif name == "digits-20":
        every = digits_folder(work / "digits-all")
        for label in sorted(p.name for p in every.iterdir()):
            (out / label).mkdir(parents=True)
            for f in sorted((every / label).iterdir())[:20]:
                shutil.copy(f, out / label / f.name)
    else:
        materialise(name, out)
    return out


def manifest(root: Path, cache: Path, extensions: list[str]) -> pd.DataFrame:
    """The readable images, less those whose bytes carry two labels (validate quarantines them)."""
    frame = scan(root, extensions, cache).query("readable").reset_index(drop=True)
    conflicting = frame.groupby("sha256")["label"].transform("nunique") > 1
    return frame[~conflicting].reset_index(drop=True)


def method_params(th: TrainHeadParams, method: str, s: Settings) -> TrainHeadParams:
    search = th.search if s.trials is None else th.search.model_copy(update={"trials": s.trials})
    if method == "default":
        search = search.model_copy(update={"trials": 0})
    return th.model_copy(
        update={"search": search, "augment_views": s.views if method.endswith("views") else 0}
    )


def run_method(features: Features, data: dict, classes: list[str], p: TrainHeadParams, seed: int) -> dict:
    """One head as train_head trains it on data's train and val rows, scored on its test rows."""
    (xt, yt, tr), (xv, yv, va), (xs, ys, _) = (data[k] for k in ("train", "val", "test"))
    views, views_s, computed = None, [0.0], [0]

    def extract(rows: pd.DataFrame) -> np.ndarray:
        start = time.perf_counter()
        v, n = features.views(list(rows["file"]), list(rows["sha256"]), p.augment_views, seed)
        views_s[0], computed[0] = views_s[0] + time.perf_counter() - start, computed[0] + n
        return v

    if p.augment_views:
        views = extract(tr)
    start, before = time.perf_counter(), views_s[0]
    head, history, best, search = train_best_head(
        xt, yt, xv, yv, views, len(classes), p, seed, val_views=lambda: extract(va)
    )
    head_s = time.perf_counter() - start - (views_s[0] - before)  # the val rows' views: extraction
    with torch.no_grad():
        pred = head(torch.from_numpy(xs)).argmax(1).numpy()
    acc = accuracy_interval(pred == ys, seed=seed)
    est, chosen = search.estimate or {}, search.params
    return {
        "test_accuracy": round(acc["accuracy"], 4),
        "test_ci": [round(acc["ci_low"], 4), round(acc["ci_high"], 4)],
        "macro_f1": round(classification_metrics(ys, pred, classes)["macro_f1"], 4),
        "cv_accuracy": est.get("accuracy"),
        "cv_accuracy_std": est.get("accuracy_std"),
        "search_mode": search.to_json()["mode"],
        "chosen": {k: getattr(chosen, k) for k in SEARCHED},
        "epochs": best if not search.refit else search.final_params().max_epochs,
        "trials": len(search.trials),
        "notes": search.notes,
        "head_s": round(head_s, 2),
        "views_s": round(views_s[0], 2),
        "views_computed": computed[0],
    }


def split_data(frame: pd.DataFrame, x: np.ndarray, classes: list[str], val: float, test: float, seed: int):
    """{split: (features, labels, rows)} as prepare splits the images with this seed."""
    split = assign_splits(frame, val, test, seed).to_numpy()
    y = frame["label"].map(classes.index).to_numpy(np.int64)
    return {k: (x[split == k], y[split == k], frame[split == k]) for k in ("train", "val", "test")}


def run_dataset(name: str, work: Path, cache: Path, s: Settings, th: TrainHeadParams | None = None) -> dict:
    """Every (seed, method) point of one data set: its features extracted once, then each head."""
    params = load_params(PARAMS)
    th, pp = th or params.train_head, params.prepare
    root = dataset_folder(name, work)
    frame = manifest(root, work / "scan-cache", pp.extensions)
    frame["file"] = [root / p for p in frame["path"]]
    classes = sorted(frame["label"].unique())
    features = Features(load_backbone(th.backbone, th.weights, th.weights_sha256), th.runtime, cache)
    start = time.perf_counter()
    x, computed = features(list(frame["file"]), list(frame["sha256"]))
    extraction = {"images": len(frame), "computed": computed, "wall_s": round(time.perf_counter() - start, 2)}
    methods = METHODS if name in VIEW_SETS else METHODS[:2]
    points = []
    for seed in range(s.seeds):
        data = split_data(frame, x, classes, pp.val_fraction, pp.test_fraction, seed)
        sizes = {f"n_{k}": len(v[1]) for k, v in data.items()}
        for method in methods:
            out = run_method(features, data, classes, method_params(th, method, s), seed)
            points.append({"method": method, "seed": seed, **sizes, **out})
            print(json.dumps({"dataset": name, **points[-1]}), file=sys.stderr, flush=True)
    return {
        "dataset": name,
        "classes": classes,
        "images": len(frame),
        "feature_extraction": {**extraction, "runtime": features.runtime},
        "points": points,
        "summary": summarise(points),
    }


def summarise(points: list[dict]) -> dict:
    """Per method: mean and spread over seeds; per other method: its gain over default, seed by seed."""
    frame = pd.DataFrame(points)
    out: dict = {}
    for method, g in frame.groupby("method", sort=False):
        cv = g["cv_accuracy"].dropna()
        out[method] = {
            "test_accuracy": round(float(g["test_accuracy"].mean()), 4),
            "std": round(float(g["test_accuracy"].std(ddof=0)), 4),
            "macro_f1": round(float(g["macro_f1"].mean()), 4),
            "cv_accuracy": round(float(cv.mean()), 4) if len(cv) else None,
            "ci_half_width": round(float(g["test_ci"].map(lambda c: (c[1] - c[0]) / 2).mean()), 4),
            "n_test": round(float(g["n_test"].mean()), 1),
            "head_s": round(float(g["head_s"].mean()), 2),
            "views_s": round(float(g["views_s"].mean()), 2),
            "chose_views": int(g["chosen"].map(lambda c: c["augment_views"] > 0).sum()),
            "trials": round(float(g["trials"].mean()), 1),
            "seeds": len(g),
        }
    base = frame[frame["method"] == "default"].set_index("seed")["test_accuracy"]
    for method in out:
        if method != "default":
            gain = frame[frame["method"] == method].set_index("seed")["test_accuracy"] - base
            out[method]["gain_over_default"] = {
                "mean": round(float(gain.mean()), 4),
                "helped": int((gain > 0).sum()),
                "hurt": int((gain < 0).sum()),
                "tied": int((gain == 0).sum()),
            }
    return out


def markdown(report: dict) -> str:
    """The README's table: a row per data set, mean test accuracy (spread over seeds) per method."""
    lines = [
        "| data set | images (test) | default | searched | gain (+/-/=) | searched+views | gain (+/-/=) "
        "| views chosen | head s: default / searched / +views | views s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["datasets"]:
        s = run["summary"]
        acc = {m: f"{s[m]['test_accuracy']:.3f} ({s[m]['std']:.3f})" if m in s else "-" for m in METHODS}
        gain = {m: _gain(s.get(m, {}).get("gain_over_default")) for m in METHODS}
        walls = " / ".join(f"{s[m]['head_s']:.1f}" if m in s else "-" for m in METHODS)
        sv = s.get("searched+views")
        views = f"{sv['chose_views']}/{sv['seeds']} | " if sv else "- | "
        views += f"{walls} | " + (f"{sv['views_s']:.1f}" if sv else "-")
        lines.append(
            f"| {run['dataset']} | {run['images']} ({s['default']['n_test']:.0f}) | {acc['default']} | "
            f"{acc['searched']} | {gain['searched']} | {acc['searched+views']} | {gain['searched+views']} | "
            f"{views} |"
        )
    return "\n".join(lines) + "\n"


def _gain(g: dict | None) -> str:
    return f"{g['mean']:+.3f} ({g['helped']}/{g['hurt']}/{g['tied']})" if g else "-"


def combine(reports: list[dict]) -> dict:
    """One report from several run apart with the same mode and settings; a data set twice is refused."""
    first = reports[0]
    if any((r["mode"], r["settings"]) != (first["mode"], first["settings"]) for r in reports[1:]):
        raise SystemExit("--combine: the reports were run with different modes or settings")
    names = [d["dataset"] for r in reports for d in r["datasets"]]
    if len(set(names)) < len(names):
        raise SystemExit(f"--combine: a data set appears twice: {names}")
    for d in (d for r in reports for d in r["datasets"] if d.get("points")):
        d["summary"] = summarise(d["points"])  # a report from before a summary's field was added
    runs = sorted((d for r in reports for d in r["datasets"]), key=lambda d: DATASETS.index(d["dataset"]))
    return {**first, "datasets": runs, "wall_s": round(sum(r["wall_s"] for r in reports), 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 6 trials, lfw and digits-20: minutes")
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, help="default: all (--quick: lfw, digits-20)")
    ap.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the mode's)")
    ap.add_argument("--cache", type=Path, help="the feature cache (default: a temporary folder)")
    ap.add_argument("--markdown", type=Path, help="write the summary table to this Markdown file")
    ap.add_argument("--combine", nargs="+", type=Path, metavar="REPORT", help="assemble reports run apart")
    args = ap.parse_args(argv)
    if args.combine:
        return finish(combine([json.loads(p.read_text()) for p in args.combine]), args)
    s = replace(QUICK if args.quick else FULL, **({"seeds": args.seeds} if args.seeds else {}))
    names = args.datasets or (["lfw", "digits-20"] if args.quick else list(DATASETS))
    report = {
        "benchmark": "quality",
        "mode": "quick" if args.quick else "full",
        "settings": asdict(s),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads_heads": 1,  # training.fit_head
            "python": platform.python_version(),
        },
        "datasets": [],
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp) / "features"
        for name in names:
            report["datasets"].append(run_dataset(name, Path(tmp) / "data", cache, s))
    report["wall_s"] = round(time.perf_counter() - start, 1)
    return finish(report, args)


def finish(report: dict, args) -> dict:
    print(json.dumps(report, indent=2, default=str))
    if args.markdown:
        args.markdown.write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
