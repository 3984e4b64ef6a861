"""Benchmark (not a test): learning curves of transfer learning against training from scratch.

    python -m benchmarks.transfer [--quick] [--plot curves.png] [--datasets digits lfw ...]
                                  [--sizes 5 10 ...] [--seeds 3] [--device auto]

Test accuracy against labelled images per class (5, 10, 20, 50, 100, 400, capped by what each set
has) on elpv `defect` (shifted from ImageNet), elpv `type`, lfw faces and scikit-learn's 8x8 digits
(a mismatch), for three candidates, each through the library's own training code:
- head_only: a new head (training.fit_head, train_head's defaults) on the frozen Lite0's features
  (features.Features); its wall time is the fit alone: the features of every image are extracted
  once per data set (reported as `feature_extraction`), as train_head's cache makes them;
- finetuned: finetune.tune from that head, where finetune's default gate would open (its keep rule
  decides, as in the pipeline: the point is the model the stage keeps); skipped under --quick;
- scratch: scratch.train_scratch (the CIFAR ResNet-20, scratch's defaults).
Each point draws n training and max(2, n/4) validation images per class from a pool, per seed; the
test images (a fixed, class-balanced set per data set) are the same for every point. Each point's
wall time and the process's peak resident memory during it are recorded. Prints one JSON report,
with each data set's crossing point (the smallest size from which scratch's mean test accuracy is at
least the best transfer candidate's at every larger size); --plot writes the curves as a PNG.
--quick (1 seed, sizes 5/20/50, 50 test images per class, scratch.max_epochs=20, no fine-tuning)
aims at 10 minutes on 2 free CPU cores; its figures are indicative, not the benchmark's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from headstart.backbones import load_backbone
from headstart.checkpoint import EpochCheckpoint
from headstart.config import FinetuneParams, PrepareParams, ScratchParams, TrainHeadParams
from headstart.data.builtin import pull
from headstart.data.manifest import scan
from headstart.features import Features
from headstart.finetune import Images, gate, resolve_device, tune
from headstart.scratch import Normalise, checkpoint_key, input_spec, load_arrays, train_scratch
from headstart.training import fit_head, load_model, model_bytes

DATASETS = ("elpv-defect", "elpv-type", "lfw", "digits")
METHODS = ("head_only", "finetuned", "scratch")


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...] = (5, 10, 20, 50, 100, 400)
    seeds: int = 3
    test_per_class: int = 100  # at most a quarter of the smallest class
    finetune: bool = True
    scratch_epochs: int | None = None  # None: scratch's default


FULL = Settings()
# scratch's cost dominates: 20 epochs (patience 10) at 5/20/50 per class keep the run near 10 minutes
QUICK = Settings(sizes=(5, 20, 50), seeds=1, test_per_class=50, finetune=False, scratch_epochs=20)


def materialise(name: str, out: Path) -> Path:
    """A data set as an image folder <out>/<class>/<file>.png."""
    if name.startswith("elpv-"):
        pull("elpv", out, task=name.removeprefix("elpv-"))
    elif name == "lfw":
        pull("lfw", out)
    elif name == "digits":
        digits_folder(out)
    else:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    return out


def digits_folder(out: Path) -> Path:
    """scikit-learn's 1,797 8x8 digits (levels 0-16) as grey PNGs, 0-255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        (out / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(img * 255 / 16).astype(np.uint8), "L").save(
            out / str(label) / f"{i:04d}.png"
        )
    return out


@dataclass
class Split:
    train: Images
    val: Images
    test: Images
    rows: pd.DataFrame  # the training rows of the manifest (scratch's input spec comes from them)


def val_size(n: int) -> int:
    return max(2, math.ceil(n / 4))


def plan(frame: pd.DataFrame, s: Settings) -> tuple[pd.DataFrame, pd.DataFrame, list[int]]:
    """The fixed test rows (class-balanced), the pool the points draw from, and the sizes the pool
    allows (those that fit, plus the largest that fits when a larger size was asked for)."""
    counts = frame["label"].value_counts()
    per_class = min(s.test_per_class, int(counts.min()) // 4)
    ranked = frame.sort_values("sha256")  # a fixed order that does not depend on file names
    test = ranked.groupby("label").head(per_class)
    pool = frame.drop(test.index)
    room = int(pool["label"].value_counts().min())
    sizes = [n for n in s.sizes if n + val_size(n) <= room]
    largest = max(n for n in range(1, room + 1) if n + val_size(n) <= room)
    if len(sizes) < len(s.sizes) and largest not in sizes:
        sizes.append(largest)
    return test, pool, sizes


def draw(pool: pd.DataFrame, test: pd.DataFrame, root: Path, n: int, seed: int) -> Split:
    """n training and val_size(n) validation images per class, drawn from the pool by `seed`."""
    shuffled = pool.sample(frac=1.0, random_state=seed)
    train = shuffled.groupby("label").head(n)
    val = shuffled.drop(train.index).groupby("label").head(val_size(n))
    return Split(*(images(r, root) for r in (train, val, test)), train)


def images(rows: pd.DataFrame, root: Path) -> Images:
    return Images([root / p for p in rows["path"]], list(rows["sha256"]), list(rows["label"]))


class Peak:
    """The process's peak resident memory while a block runs, sampled every 10 ms from /proc
    (GPU memory from torch, on CUDA)."""

    def __init__(self):
        self.peak, self._stop = self.rss(), threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the lifetime peak is the best there is
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.rss())

    @contextmanager
    def watch(self):
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.peak = max(self.peak, self.rss())


def measured(fn, *args) -> tuple[dict, dict]:
    """fn's result dict, and its wall time and peak memory."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with Peak().watch() as peak:
        out = fn(*args)
    cost = {"wall_s": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak.peak / 2**20)}
    if torch.cuda.is_available():
        cost["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out, cost


def accuracy(pred: np.ndarray | torch.Tensor, labels: list[str], classes: list[str]) -> float:
    y = np.array([classes.index(c) for c in labels])
    return round(float((np.asarray(pred) == y).mean()), 4)


def head_only(features: Features, split: Split, classes: list[str], th: TrainHeadParams, seed: int) -> dict:
    x = {k: features(getattr(split, k).paths, getattr(split, k).shas)[0] for k in ("train", "val", "test")}
    y = {k: np.array([classes.index(c) for c in getattr(split, k).labels]) for k in ("train", "val")}
    head, history, best = fit_head(x["train"], y["train"], x["val"], y["val"], len(classes), th, seed)
    with torch.no_grad():
        pred = head(torch.from_numpy(x["test"])).argmax(1).numpy()
    return {
        "test_accuracy": accuracy(pred, split.test.labels, classes),
        "val_accuracy": round(history[best - 1]["val_accuracy"], 4),
        "epochs": len(history),
        "head": head,
    }


def finetuned(
    features: Features, split: Split, classes, th, head, seed: int, work: Path, device: str
) -> dict:
    """finetune.tune from the head-only model, as the stage runs it; the model it keeps is scored."""
    work.mkdir(parents=True, exist_ok=True)
    head_file = work / "head.pt"
    head_file.write_bytes(model_bytes(features.backbone, head, classes, th))
    p = FinetuneParams(device=device)
    tuned = tune(head_file, split.train, split.val, p, th, seed, work / "cache")
    kept = work / "kept.pt"
    kept.write_bytes(tuned.model)
    model = load_model(kept)
    x, _ = Features(model.backbone, th.runtime, work / "cache")(split.test.paths, split.test.shas)
    d = tuned.decision
    return {
        "test_accuracy": accuracy(model.probabilities(x).argmax(1), split.test.labels, classes),
        "val_accuracy": round(d["val_accuracy_finetuned" if d["finetuned"] else "val_accuracy_head_only"], 4),
        "finetuned_kept": d["finetuned"],
        "epochs": d["epochs_run"],
    }


def scratch(split: Split, classes: list[str], p: ScratchParams, seed: int, work: Path) -> dict:
    device = resolve_device(p.device, "scratch.device")
    spec = input_spec(split.rows)
    key = checkpoint_key(spec, p, seed, device, split.train, split.val)
    ckpt = EpochCheckpoint(work / "scratch" / key / "checkpoint.pt", key, "scratch")
    result = train_scratch(split.train, split.val, spec, p, seed, device, ckpt, classes=classes)
    x, _ = load_arrays(split.test, spec, classes, "scratch decode (test)")
    with torch.no_grad():
        pred = result.model(Normalise(spec)(x.permute(0, 3, 1, 2).float())).argmax(1).numpy()
    best = result.history[result.best_epoch - 1]
    return {
        "test_accuracy": accuracy(pred, split.test.labels, classes),
        "val_accuracy": round(best["val_accuracy"], 4),
        "epochs": len(result.history),
        "input": f"{spec.size}px x{spec.channels}",
        "parameters": result.parameters,
    }


def run_dataset(
    name: str, work: Path, s: Settings, device: str = "auto", th: TrainHeadParams | None = None
) -> dict:
    """Every point of one data set: materialise it, extract the transfer features once, then train
    each candidate at each size and seed."""
    th = th or TrainHeadParams()
    root = materialise(name, work / name)
    frame = scan(root, PrepareParams().extensions, work / "cache").query("readable").reset_index(drop=True)
    classes = sorted(frame["label"].unique())
    test, pool, sizes = plan(frame, s)
    splits = {(n, seed): draw(pool, test, root, n, seed) for n in sizes for seed in range(s.seeds)}
    used = {
        sha: path
        for d in splits.values()
        for x in (d.train, d.val, d.test)
        for sha, path in zip(x.shas, x.paths, strict=True)
    }
    features = Features(load_backbone(th.backbone, th.weights, th.weights_sha256), th.runtime, work / "cache")
    _, cost = measured(lambda: features(list(used.values()), list(used)))
    sp = ScratchParams(device=device, **({"max_epochs": s.scratch_epochs} if s.scratch_epochs else {}))
    points = []
    for (n, seed), split in splits.items():
        first = len(points)
        base = {
            "per_class": n,
            "seed": seed,
            "n_train": len(split.train.labels),
            "n_val": len(split.val.labels),
        }
        out, c = measured(head_only, features, split, classes, th, seed)
        head = out.pop("head")
        points.append({"method": "head_only", **base, **out, **c})
        closed = gate(FinetuneParams(), base["n_train"], "not measured")  # require_shifted is off
        if not s.finetune or closed:
            if seed == 0:
                why = "--quick: fine-tuning is not run" if not s.finetune else closed
                points.append({"method": "finetuned", **base, "skipped": why})
        else:
            out, c = measured(finetuned, features, split, classes, th, head, seed, work / "ft", device)
            points.append({"method": "finetuned", **base, **out, **c})
        out, c = measured(scratch, split, classes, sp, seed, work)
        points.append({"method": "scratch", **base, **out, **c})
        for point in points[first:]:
            print(json.dumps({"dataset": name, **point}), file=sys.stderr, flush=True)
    summary = summarise(points)
    return {
        "dataset": name,
        "classes": classes,
        "images": int(len(frame)),
        "test_images": int(len(test)),
        "sizes": sizes,
        "feature_extraction": {"images": int(len(used)), **cost, "runtime": features.runtime},
        "points": points,
        "summary": summary,
        "crossing": crossing(summary),
    }


def summarise(points: list[dict]) -> dict:
    """Mean and spread over seeds of each method at each size: {method: {n: {...}}}."""
    frame = pd.DataFrame([p for p in points if "test_accuracy" in p])
    out: dict = {}
    for (method, n), g in frame.groupby(["method", "per_class"]):
        out.setdefault(method, {})[int(n)] = {
            "test_accuracy": round(float(g["test_accuracy"].mean()), 4),
            "std": round(float(g["test_accuracy"].std(ddof=0)), 4),
            "seeds": len(g),
            "wall_s": round(float(g["wall_s"].mean()), 2),
            "peak_rss_mb": int(g["peak_rss_mb"].max()),
        }
    return out


def crossing(summary: dict) -> dict:
    """The smallest size from which scratch's mean test accuracy is at least the best transfer
    candidate's at that size and every larger one (None: it never overtook transfer here)."""
    sizes = sorted(summary.get("scratch", {}))
    transfer = {
        n: max(summary[m][n]["test_accuracy"] for m in ("head_only", "finetuned") if n in summary.get(m, {}))
        for n in sizes
    }
    wins = [summary["scratch"][n]["test_accuracy"] >= transfer[n] for n in sizes]
    at = next((n for i, n in enumerate(sizes) if all(wins[i:])), None)
    gaps = {n: round(summary["scratch"][n]["test_accuracy"] - transfer[n], 4) for n in sizes}
    return {"scratch_overtakes_at_per_class": at, "scratch_minus_best_transfer": gaps}


def plot(report: dict, path: Path) -> Path:
    """One panel per data set: test accuracy against images per class (log scale), one line per
    candidate, bars for the spread over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["datasets"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        for method, style in zip(METHODS, ("o-", "s--", "^-"), strict=True):
            rows = run["summary"].get(method, {})
            if rows:
                n = sorted(rows)
                acc, std = [rows[k]["test_accuracy"] for k in n], [rows[k]["std"] for k in n]
                ax.errorbar(n, acc, std, fmt=style, capsize=3, label=method.replace("_", " "))
        ax.set(xscale="log", title=run["dataset"], xlabel="training images per class")
        ax.minorticks_off()  # log-scale minor labels (3x10^1) would overprint the sizes
        ax.set_xticks(run["sizes"], [str(n) for n in run["sizes"]])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"transfer vs scratch ({report['mode']} run)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(report: dict) -> str:
    """The summary as a Markdown table (README), one row per data set and size."""
    lines = [
        "| data set | per class | head only | fine-tuned | scratch | scratch wall s | head wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in report["datasets"]:
        s = run["summary"]
        for n in run["sizes"]:
            cell = {m: s.get(m, {}).get(n) for m in METHODS}
            acc = {m: f"{c['test_accuracy']:.3f}" if c else "-" for m, c in cell.items()}
            lines.append(
                f"| {run['dataset']} | {n} | {acc['head_only']} | {acc['finetuned']} | {acc['scratch']} | "
                f"{cell['scratch']['wall_s'] if cell['scratch'] else '-'} | "
                f"{cell['head_only']['wall_s'] if cell['head_only'] else '-'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 sizes, no fine-tuning: ~10 min")
    ap.add_argument("--plot", type=Path, help="write the learning curves to this PNG")
    ap.add_argument("--markdown", type=Path, help="write the summary table to this Markdown file")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--sizes", nargs="+", type=int, help="images per class (default: the mode's)")
    ap.add_argument("--seeds", type=int, help="seeds per point (default: the mode's)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        metavar="REPORT",
        help="assemble reports run apart (e.g. one per data set) into one, instead of running",
    )
    args = ap.parse_args(argv)
    if args.combine:
        return finish(combine([json.loads(p.read_text()) for p in args.combine]), args)
    s = QUICK if args.quick else FULL
    s = replace(s, sizes=tuple(args.sizes or s.sizes), seeds=args.seeds or s.seeds)
    report = {
        "benchmark": "transfer",
        "mode": "quick" if args.quick else "full",
        "settings": s.__dict__,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "python": platform.python_version(),
        },
        "datasets": [],
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            report["datasets"].append(run_dataset(name, Path(tmp), s, args.device))
    report["wall_s"] = round(time.perf_counter() - start, 1)
    return finish(report, args)


def combine(reports: list[dict]) -> dict:
    """One report from several run with the same mode and settings (e.g. a data set per process or
    machine); the sizes may differ (each data set lists its own), and the report's settings then
    say which sizes each data set asked for. A data set in two of them is refused rather than
    silently doubled."""
    first = reports[0]

    def same(r: dict) -> tuple:
        return r["mode"], {k: v for k, v in r["settings"].items() if k != "sizes"}

    for r in reports[1:]:
        if same(r) != same(first):
            raise SystemExit("--combine: the reports were run with different modes or settings")
    names = [d["dataset"] for r in reports for d in r["datasets"]]
    if len(set(names)) < len(names):
        raise SystemExit(f"--combine: a data set appears twice: {names}")
    sizes = {d["dataset"]: r["settings"].get("sizes") for r in reports for d in r["datasets"]}
    for r in reports:  # JSON made the summaries' sizes strings: "100" would sort before "20"
        for d in r["datasets"]:
            d["summary"] = {m: {int(n): v for n, v in rows.items()} for m, rows in d["summary"].items()}
    return {
        **first,
        "settings": {**first["settings"], "sizes": sizes},
        "datasets": [d for r in reports for d in r["datasets"]],
        "wall_s": round(sum(r["wall_s"] for r in reports), 1),
    }


def finish(report: dict, args) -> dict:
    print(json.dumps(report, indent=2, default=str))
    if args.plot:
        plot(report, args.plot)
    if args.markdown:
        args.markdown.write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
