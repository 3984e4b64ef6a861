"""Study (not a test, not in make bench): which out-of-distribution score should the gate ship?

    python -m benchmarks.ood_scores [--quick] [--datasets lfw elpv-type ...] [--seeds 3]
                                    [--alpha 0.1] [--cache DIR] [--markdown FILE]

benchmarks.abstention found the logit scores (max softmax, energy) of a head-only model far too weak
to reject noise and flat images. This study measures scores on the frozen Lite0's pooled features
instead, without the pipeline: for each data set and seed it draws training, calibration (held-out,
~50-100 images, as the validation split would be) and test images per class; extracts every image's
features once with headstart.features.Features (the cached ONNX extractor, as train_head does);
fits a head with training.fit_head (train_head's defaults, calibration images as its validation set);
then scores the own test images, each other real data set (a different source, at most --max-foreign
images) and benchmarks.abstention.synthetic()'s noise and flat images. Scores (higher = stranger):
- msp, energy: the head's logits (the baseline);
- maha: distance to the nearest class mean, shared within-class covariance with Ledoit-Wolf
  shrinkage (Lee et al. 2018), in the full feature space and after a PCA to k dims (maha_pca{k});
- maha_ppca{k}: the same full-space distance with the covariance cut to its top k eigenvectors plus
  one isotropic variance for the rest (probabilistic PCA): what leaves the subspace still counts;
  maha_ppca{k}_unit: the same on L2-normalised features (the direction only, not the norm): the
  gate headstart ships, fitted by headstart.calibration.fit_gate;
- rel_maha: class-conditional minus a class-agnostic background Gaussian (Ren et al. 2021), full and
  after PCA to k dims;
- residual_pca{k}: the norm of the part of the centred features outside the training PCA subspace;
- knn{k}: distance to the k-th nearest L2-normalised training feature (Sun et al. 2022); knn{k}_pca64
  first projects the normalised features on their top 64 principal components (a smaller bank);
- NAME+flat, for the scores in GUARDED: the score, and every image whose pixels (after the backbone's
  resize and crop) vary by less than FLAT grey levels rejected whatever the score says.
For each: AUROC of own test against each group, and the operational figures at --alpha: threshold at
the calibration scores' finite-sample (1 - alpha) quantile, the share of own test kept and of each
group rejected, with the issue's bars (kept >= 1 - alpha - 0.05, other set > 0.5, synthetic >= 0.99).
Each score's constants (float32 bytes) beyond the head say what it costs to ship inside the ONNX graph.
--quick: one seed, 100 images per synthetic kind, 200 per foreign set.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.abstention import SLACK, SYNTHETIC, ood_scores, synthetic
from benchmarks.transfer import materialise
from headstart.backbones import load_backbone
from headstart.calibration import fit_gate
from headstart.config import PrepareParams, TrainHeadParams
from headstart.data.manifest import scan
from headstart.features import Features
from headstart.preprocess import decode, to_uint8
from headstart.training import fit_head

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("lfw", "elpv-type", "elpv-defect", "digits")
KS = (16, 32, 64)
MOST, FAR_OOD = 0.5, 0.99
FLAT, BIG = 2.0, 1e30  # grey levels of pixel std below which an image carries nothing to classify
GUARDED = ("energy", "maha_ppca32", "maha_ppca32_unit", "residual_pca32", "knn5", "knn5_pca64")


@dataclass(frozen=True)
class Settings:
    seeds: int = 3
    train_per_class: int = 100
    cal_images: int = 100  # in all, split evenly over the classes
    test_per_class: int = 100
    share_test: float = 0.3  # at most this share of a class is test, and as much again calibration
    pool_per_class: int = 250  # seeds redraw from a fixed pool: fewer features to extract on 2 cores
    per_kind: int = 200
    max_foreign: int = 300
    alpha: float = 0.1


FULL = Settings()
QUICK = Settings(seeds=1, per_kind=100, max_foreign=200)


# --- data ---------------------------------------------------------------------------------------------


def scanned(root: Path, cache: Path) -> pd.DataFrame:
    frame = scan(root, PrepareParams().extensions, cache).query("readable").reset_index(drop=True)
    return frame.assign(path=[str(root / p) for p in frame["path"]])


def synthetic_folder(out: Path, n: int) -> Path:
    """benchmarks.abstention's synthetic images as files <out>/<kind>/<i>.png, for the feature cache."""
    for kind in SYNTHETIC:
        (out / kind).mkdir(parents=True, exist_ok=True)
        for i, blob in enumerate(synthetic(kind, n)):
            (out / kind / f"{i:04d}.png").write_bytes(blob)
    return out


def split(frame: pd.DataFrame, s: Settings, seed: int) -> dict[str, pd.DataFrame]:
    """Per class: test, then calibration, then training images, drawn by the seed."""
    pool = frame.groupby("label").sample(frac=1.0, random_state=0).groupby("label").head(s.pool_per_class)
    shuffled = pool.sample(frac=1.0, random_state=seed)
    n_classes = frame["label"].nunique()
    parts = {"train": [], "cal": [], "test": []}
    for _, rows in shuffled.groupby("label"):
        n_test = min(s.test_per_class, int(len(rows) * s.share_test))
        n_cal = min(max(5, s.cal_images // n_classes), int(len(rows) * s.share_test))
        parts["test"].append(rows[:n_test])
        parts["cal"].append(rows[n_test : n_test + n_cal])
        parts["train"].append(rows[n_test + n_cal : n_test + n_cal + s.train_per_class])
    return {k: pd.concat(v) for k, v in parts.items()}


def sample(frame: pd.DataFrame, limit: int, seed: int = 0) -> pd.DataFrame:
    return frame if len(frame) <= limit else frame.sample(limit, random_state=seed)


# --- scores: each fitted on the training features, higher = stranger ---------------------------------


@dataclass
class Score:
    fn: Callable[[np.ndarray], np.ndarray]
    constants: int  # float32 numbers it needs beyond the head


def shrunk_precision(x: np.ndarray) -> np.ndarray:
    from sklearn.covariance import LedoitWolf

    return LedoitWolf(assume_centered=True).fit(x).precision_


def class_means(x: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    return np.stack([x[y == c].mean(0) for c in range(n_classes)])


def quad(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(n, C) squared Mahalanobis distances of each row to each mean."""
    r = x[:, None, :] - means[None]
    return ((r @ precision) * r).sum(-1)


def maha(x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[Callable, np.ndarray, np.ndarray]:
    """Min class distance with a shared, shrunk within-class covariance; and the fitted pieces."""
    means = class_means(x, y, n_classes)
    precision = shrunk_precision(x - means[y])
    return (lambda z: quad(z, means, precision).min(1)), means, precision


def rel_maha(x: np.ndarray, y: np.ndarray, n_classes: int) -> Callable:
    """Ren et al. 2021: min over classes of (class distance - background distance)."""
    _, means, precision = maha(x, y, n_classes)
    mu = x.mean(0, keepdims=True)
    background = shrunk_precision(x - mu)
    return lambda z: quad(z, means, precision).min(1) - quad(z, mu, background)[:, 0]


def pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, d x k orthonormal basis) of the training features' top k principal components."""
    mu = x.mean(0)
    _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
    return mu, vt[:k].T


def ppca(x: np.ndarray, y: np.ndarray, n_classes: int, k: int) -> Callable:
    """Full-space class distance, the within-class covariance cut to k eigenvectors + isotropic rest."""
    from sklearn.covariance import LedoitWolf

    means = class_means(x, y, n_classes)
    cov = LedoitWolf(assume_centered=True).fit(x - means[y]).covariance_
    values, vectors = np.linalg.eigh(cov)
    top, v = values[::-1][:k], vectors[:, ::-1][:, :k]
    rest = (values.sum() - top.sum()) / (len(values) - k)

    def fn(z: np.ndarray) -> np.ndarray:
        r = z[:, None, :] - means[None]
        inside = r @ v
        return ((inside**2 / top).sum(-1) + ((r**2).sum(-1) - (inside**2).sum(-1)) / rest).min(1)

    return fn


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def knn(x: np.ndarray, k: int, dims: int | None = None) -> Callable:
    """Cosine distance to the k-th nearest training feature; with `dims`, the normalised features
    are first projected on their top principal components (the bank shrinks to n x dims)."""
    bank = unit(x)
    w = None if dims is None else pca(bank, dims)[1]
    project = (lambda z: z) if w is None else (lambda z: unit(z @ w))
    bank = project(bank)
    return lambda z: 1 - np.sort(project(unit(z)) @ bank.T, axis=1)[:, -k]


def fit_scores(x: np.ndarray, y: np.ndarray, n_classes: int, head: torch.nn.Module) -> dict[str, Score]:
    d, n = x.shape[1], len(x)

    def logit(name: str) -> Callable:
        def fn(z: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return -ood_scores(head(torch.from_numpy(z)).numpy())[name]

        return fn

    scores = {"msp": Score(logit("msp"), 0), "energy": Score(logit("energy"), 0)}
    scores["maha"] = Score(maha(x, y, n_classes)[0], d * d + n_classes * d)
    scores["rel_maha"] = Score(rel_maha(x, y, n_classes), 2 * d * d + (n_classes + 1) * d)
    for k in KS:
        if k >= n:
            continue
        mu, w = pca(x, k)
        project = lambda z, mu=mu, w=w: (z - mu) @ w  # noqa: E731
        fitted = maha(project(x), y, n_classes)[0]
        scores[f"maha_pca{k}"] = Score(lambda z, f=fitted, p=project: f(p(z)), d * k + d + n_classes * k)
        rel = rel_maha(project(x), y, n_classes)
        scores[f"rel_maha_pca{k}"] = Score(
            lambda z, f=rel, p=project: f(p(z)), d * k + d + (n_classes + 1) * k
        )
        scores[f"maha_ppca{k}"] = Score(ppca(x, y, n_classes, k), d * k + n_classes * d + k + 1)
        gate, _ = fit_gate(x, y, n_classes, k)  # the shipped gate: the direction only, not the norm
        if gate is not None:
            scores[f"maha_ppca{k}_unit"] = Score(gate.score, d * k + n_classes * d + k + 1)
        scores[f"residual_pca{k}"] = Score(
            lambda z, mu=mu, w=w: np.linalg.norm((z - mu) - (z - mu) @ w @ w.T, axis=1), d * k + d
        )
    for k in (1, 5):
        scores[f"knn{k}"] = Score(knn(x, k), n * d)
        if n > 64:
            scores[f"knn{k}_pca64"] = Score(knn(x, k, 64), d * 64 + n * 64)
    return scores


# --- figures -----------------------------------------------------------------------------------------


def threshold(cal: np.ndarray, alpha: float) -> float:
    """The finite-sample (1 - alpha) quantile: at most alpha of exchangeable own images score above it
    on average over draws (infinite when the calibration set is too small for that alpha)."""
    rank = math.ceil((len(cal) + 1) * (1 - alpha))
    return float(np.sort(cal)[rank - 1]) if rank <= len(cal) else math.inf


def auroc(own: np.ndarray, other: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(own)), np.zeros(len(other))]
    return round(float(roc_auc_score(y, -np.r_[own, other])), 4)


def contrast(paths: list[str], spec) -> np.ndarray:
    """Each image's pixel standard deviation in grey levels, after the backbone's resize and crop."""
    return np.array([to_uint8(decode(p), spec).std() for p in paths])


def guarded(s: dict[str, np.ndarray], flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The score, with images below FLAT grey levels of contrast rejected whatever it says (a large
    finite value: AUROC refuses infinity)."""
    return {g: np.where(flat[g] < FLAT, BIG, v) for g, v in s.items()}


def evaluate(s: dict[str, np.ndarray], alpha: float) -> dict:
    """AUROC of own test vs each group; kept/rejected shares at the calibration threshold."""
    tau = threshold(s["cal"], alpha)
    groups = [g for g in s if g not in ("cal", "test")]
    return {
        "auroc": {g: auroc(s["test"], s[g]) for g in groups},
        "kept": round(float((s["test"] <= tau).mean()), 4),
        "rejected": {g: round(float((s[g] > tau).mean()), 4) for g in groups},
    }


def bars(fig: dict, alpha: float) -> bool:
    ok = fig["kept"] >= 1 - alpha - SLACK
    return ok and all(v >= FAR_OOD if g in SYNTHETIC else v > MOST for g, v in fig["rejected"].items())


def summarise(per_seed: list[dict], alpha: float) -> dict:
    """Mean and worst over seeds of every figure, and in how many seeds all the bars hold."""

    def agg(values: list[float], worst) -> dict:
        return {"mean": round(float(np.mean(values)), 4), "worst": round(float(worst(values)), 4)}

    first = per_seed[0]
    return {
        "auroc": {g: agg([f["auroc"][g] for f in per_seed], min) for g in first["auroc"]},
        "kept": agg([f["kept"] for f in per_seed], min),
        "rejected": {g: agg([f["rejected"][g] for f in per_seed], min) for g in first["rejected"]},
        "bars_hold": f"{sum(bars(f, alpha) for f in per_seed)}/{len(per_seed)}",
    }


# --- one data set ------------------------------------------------------------------------------------


def run_dataset(
    name: str, frames: dict[str, pd.DataFrame], features: Features, s: Settings, th: TrainHeadParams
) -> dict:
    frame = frames[name]
    classes = sorted(frame["label"].unique())
    others = {
        f: sample(v, s.max_foreign) for f, v in frames.items() if source(f) not in (source(name), "synth")
    }
    others |= {k: frames["synth"].query("label == @k") for k in SYNTHETIC}
    feats = lambda rows: features(list(map(Path, rows["path"])), list(rows["sha256"]))[0]  # noqa: E731
    x_other = {g: feats(rows) for g, rows in others.items()}
    spec = features.backbone.spec
    flat_other = {g: contrast(list(rows["path"]), spec) for g, rows in others.items()}
    per_seed, sizes, constants, acc = {}, [], {}, []
    for seed in range(s.seeds):
        parts = split(frame, s, seed)
        x = {k: feats(v) for k, v in parts.items()}
        y = {k: v["label"].map(classes.index).to_numpy(np.int64) for k, v in parts.items()}
        head, _, _ = fit_head(x["train"], y["train"], x["cal"], y["cal"], len(classes), th, seed)
        with torch.no_grad():
            acc.append(float((head(torch.from_numpy(x["test"])).argmax(1).numpy() == y["test"]).mean()))
        sizes.append({k: len(v) for k, v in parts.items()})
        groups = {"cal": x["cal"], "test": x["test"], **x_other}
        flat = {k: contrast(list(parts[k]["path"]), spec) for k in ("cal", "test")} | flat_other
        for sname, score in fit_scores(x["train"], y["train"], len(classes), head).items():
            raw = {g: score.fn(v) for g, v in groups.items()}
            per_seed.setdefault(sname, []).append(evaluate(raw, s.alpha))
            constants[sname] = score.constants * 4
            if sname in GUARDED:
                per_seed.setdefault(f"{sname}+flat", []).append(evaluate(guarded(raw, flat), s.alpha))
                constants[f"{sname}+flat"] = score.constants * 4
        print(f"{name} seed {seed}: done", file=sys.stderr, flush=True)
    return {
        "dataset": name,
        "classes": classes,
        "images": sizes,
        "foreign": {g: len(v) for g, v in x_other.items()},
        "head_test_accuracy": [round(a, 4) for a in acc],
        "scores": {
            k: {**summarise(v, s.alpha), "constants_bytes": constants[k], "per_seed": v}
            for k, v in per_seed.items()
        },
    }


def source(name: str) -> str:
    return name.split("-")[0]


def markdown(report: dict) -> str:
    alpha = report["settings"]["alpha"]
    lines = []
    for run in report["datasets"]:
        groups = list(next(iter(run["scores"].values()))["rejected"])
        lines += [
            f"\n{run['dataset']} (alpha = {alpha}; mean over seeds, worst in brackets)\n",
            "| score | constants | AUROC "
            + " / ".join(groups)
            + " | kept | rejected "
            + " / ".join(groups)
            + " | bars |",
            "|---|---|---|---|---|---|",
        ]
        for k, v in run["scores"].items():
            au = " / ".join(f"{v['auroc'][g]['mean']:.3f}" for g in groups)
            rej = " / ".join(
                f"{v['rejected'][g]['mean']:.2f} ({v['rejected'][g]['worst']:.2f})" for g in groups
            )
            size = f"{v['constants_bytes'] / 1024:.0f} KiB"
            lines.append(
                f"| {k} | {size} | {au} | {v['kept']['mean']:.3f} ({v['kept']['worst']:.3f}) | {rej} "
                f"| {v['bars_hold']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, fewer synthetic and foreign images")
    ap.add_argument("--datasets", nargs="+", default=["lfw", "elpv-type", "elpv-defect"], choices=DATASETS)
    ap.add_argument("--seeds", type=int, help="draws of train/calibration/test per data set")
    ap.add_argument("--alpha", type=float, help="share of own images the gate may reject (default 0.1)")
    ap.add_argument("--cache", type=Path, help="feature cache (default: a temporary folder)")
    ap.add_argument("--markdown", type=Path, help="write the tables to this Markdown file")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else FULL
    s = Settings(**{**s.__dict__, **{k: v for k, v in (("seeds", args.seeds), ("alpha", args.alpha)) if v}})
    th = TrainHeadParams()
    report = {"benchmark": "ood_scores", "mode": "quick" if args.quick else "full", "settings": s.__dict__}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work, cache = Path(tmp), args.cache or Path(tmp) / "cache"
        names = list(dict.fromkeys([*args.datasets, "lfw", "elpv-type"]))
        frames = {n: scanned(materialise(n, work / n), cache) for n in names}
        frames["synth"] = scanned(synthetic_folder(work / "synth", s.per_kind), cache)
        features = Features(load_backbone(th.backbone, th.weights, th.weights_sha256), th.runtime, cache)
        report["runtime"] = features.runtime
        report["datasets"] = [run_dataset(n, frames, features, s, th) for n in args.datasets]
    report["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2, default=str))
    print(markdown(report), file=sys.stderr)
    if args.markdown:
        args.markdown.write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
