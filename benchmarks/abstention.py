"""Benchmark (not a test): does each model say "I don't know" where it should, and only there?

    python -m benchmarks.abstention [--quick] [--datasets elpv-type lfw] [--foreign ...]
                                    [--set SECTION.KEY=VALUE ...] [--markdown FILE]

For each data set in --datasets (materialised as benchmarks.transfer does), a model is trained the
way a user trains one: `headstart run --data FOLDER` in a temporary project (its own params.yaml,
artifacts, feature cache and MLflow store). Its exported artifacts/export/model.onnx is loaded with
headstart.runtime.Predictor and every image goes through the model once: Predictor.logits, then
Predictor.decide (the one place an answer, and an abstention, is made). Measured on:
- its own test images (validate's manifest, split `test`): the share kept (answered), the accuracy on
  those kept, the raw argmax accuracy, and `coverage`, the share answered correctly or declined
  (1 - the rate of confident mistakes: for two classes, an `ambiguous` abstention is the prediction
  set of both labels, which covers the truth);
- every other real data set in --foreign (a different source: elpv is never foreign to elpv): the
  share abstained, by reason;
- synthetic far-out-of-distribution PNGs, 200 of each kind (--per-kind): uniform and Gaussian RGB
  noise, and flat colours (black, white and mid-grey at each size, then random colours), at sizes
  from 32x32 to 300x300: the share abstained, by reason.
The issue's criteria are checked against the rule's own alpha (ONNX metadata `headstart.abstention`,
key `alpha`; 0.1 when the model has no rule): kept >= 1 - alpha - 0.05 on the own test images, more
than half of each foreign set abstained, >= 99% of each synthetic kind abstained. Offline, from the
same logits: AUROC of own test images against each out-of-distribution group for three scores (max
softmax probability, max logit, and the negative energy logsumexp(logits)), so the choice of the
gate's score rests on figures. Wall time of each training run and each measurement.
--quick skips fine-tuning, the scratch model and the fp16 variant, and shows at most 300 images of
each foreign set: a run that proves the plumbing, with figures of the head-only model.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from benchmarks.transfer import materialise
from headstart.runtime import Prediction, Predictor

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("elpv-type", "lfw", "elpv-defect", "digits")
SYNTHETIC = ("uniform_noise", "gaussian_noise", "flat")
SIZES = ((32, 32), (64, 48), (224, 224), (300, 300))  # width, height
FIXED_COLOURS = ((0, 0, 0), (255, 255, 255), (128, 128, 128))  # black, white, mid-grey
RULE_KEY = "headstart.abstention"
DEFAULT_ALPHA = 0.1
SCORES = ("msp", "max_logit", "energy")
MOST = 0.5  # "abstains on most images of the other set"
FAR_OOD = 0.99  # "... and on >= 99% of noise and flat images"
SLACK = 0.05  # "keeps at least 1 - alpha - 0.05 of its own test images"
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


@dataclass(frozen=True)
class Settings:
    per_kind: int = 200
    max_foreign: int | None = None  # images shown of each foreign set (None: all of them)
    overrides: tuple[str, ...] = ()  # --set for `headstart run`


FULL = Settings()
QUICK = Settings(
    max_foreign=300, overrides=("finetune.enabled=false", "scratch.run=never", "export.fp16=false")
)


# --- synthetic far-out-of-distribution images -------------------------------------------------------


def synthetic(kind: str, n: int, seed: int = 0) -> list[bytes]:
    """n PNG images of one kind (SYNTHETIC), cycling through SIZES, the same for the same seed."""
    if kind not in SYNTHETIC:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(SYNTHETIC)}")
    rng = np.random.default_rng([seed, SYNTHETIC.index(kind)])
    return [png(pixels(kind, i, rng)) for i in range(n)]


def pixels(kind: str, i: int, rng: np.random.Generator) -> np.ndarray:
    """The i-th image of a kind as HxWx3 uint8. Flat: black, white and mid-grey at every size first,
    then random colours."""
    w, h = SIZES[i % len(SIZES)]
    if kind == "uniform_noise":
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == "gaussian_noise":
        return np.clip(rng.normal(128, 64, (h, w, 3)), 0, 255).round().astype(np.uint8)
    k = i // len(SIZES)
    colour = FIXED_COLOURS[k] if k < len(FIXED_COLOURS) else rng.integers(0, 256, 3)
    return np.broadcast_to(np.asarray(colour, np.uint8), (h, w, 3)).copy()


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


# --- measuring one model ----------------------------------------------------------------------------


@dataclass
class Scored:
    """Each image's answer and, for the readable ones (in order), the logits it was made from and the
    graph's out-of-distribution score (`ood_score`, higher = farther; None: the model has no gate)."""

    predictions: list[Prediction]
    logits: np.ndarray
    wall_s: float = 0.0
    labels: list[str] | None = field(default=None, repr=False)
    gate: np.ndarray | None = None


def score(predictor: Predictor, items: list, load, names: list[str], batch_size: int = 64) -> Scored:
    """Every item through the model once (decoding in threads): Predictor.outputs (the logits and
    the gate's score), then Predictor.decide, the step every runtime takes; an unreadable item gets
    its error."""
    start = time.perf_counter()
    results = [Prediction(n) for n in names]
    rows, gates = [], []

    def one(i: int):
        try:
            return i, load(items[i])
        except Exception as exc:  # unreadable: counted apart, never an answer
            results[i].error = f"{type(exc).__name__}: {exc}"
            return i, None

    with ThreadPoolExecutor(4) as pool:
        for at in range(0, len(items), batch_size):
            loaded = [
                r for r in pool.map(one, range(at, min(at + batch_size, len(items)))) if r[1] is not None
            ]
            if not loaded:
                continue
            logits, gate = predictor.outputs(np.stack([x for _, x in loaded]))
            rows.append(logits)
            if gate is not None:
                gates.append(np.asarray(gate, np.float64).reshape(-1))
            for (i, _), d in zip(loaded, predictor.decide(logits, ood_score=gate), strict=True):
                for k, v in d.items():
                    setattr(results[i], k, v)
    z = np.concatenate(rows) if rows else np.zeros((0, len(predictor.classes)), np.float32)
    gate_all = np.concatenate(gates) if gates else None
    return Scored(results, z, round(time.perf_counter() - start, 2), gate=gate_all)


def score_files(predictor: Predictor, paths: list[Path], labels: list[str] | None = None) -> Scored:
    scored = score(predictor, paths, predictor.load, [str(p) for p in paths])
    scored.labels = labels
    return scored


def score_bytes(predictor: Predictor, blobs: list[bytes]) -> Scored:
    return score(predictor, blobs, predictor.load_bytes, [f"#{i}" for i in range(len(blobs))])


def figures(predictions: list[Prediction], labels: list[str] | None = None) -> dict:
    """Shares over the readable images: abstained (by reason) and kept; with true labels, the
    accuracy on those kept, the raw argmax accuracy, and coverage (answered correctly, or declined)."""
    read = [
        (p, y)
        for p, y in zip(predictions, labels or [None] * len(predictions), strict=True)
        if p.error is None
    ]
    n = len(read)
    declined = [p for p, _ in read if p.abstain]
    out = {
        "images": len(predictions),
        "unreadable": len(predictions) - n,
        "kept": share(n - len(declined), n),
        "abstained": share(len(declined), n),
        "by_reason": {
            r: share(c, n) for r, c in sorted(Counter(p.reason or "none" for p in declined).items())
        },
    }
    if labels is not None:
        right = [p.label == y for p, y in read]
        kept_right = [r for (p, _), r in zip(read, right, strict=True) if not p.abstain]
        out["accuracy_kept"] = share(sum(kept_right), len(kept_right))
        out["accuracy_all"] = share(sum(right), n)
        out["coverage"] = share(sum(r or bool(p.abstain) for (p, _), r in zip(read, right, strict=True)), n)
    return out


def share(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


def ood_scores(logits: np.ndarray, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """Per image, higher = more in-distribution: log max softmax probability (the same order as the
    probability, without float64's saturation at 1.0), max logit, and negative energy T*logsumexp(z/T)."""
    z = np.asarray(logits, np.float64) / temperature
    top = z.max(axis=1)
    others = np.exp(z - top[:, None])
    others[np.arange(len(z)), z.argmax(axis=1)] = 0  # the rest on its own: 1 + 1e-26 would round to 1
    rest = np.log1p(others.sum(axis=1))
    return {"msp": -rest, "max_logit": top * temperature, "energy": (top + rest) * temperature}


def aurocs(
    own: np.ndarray,
    other: np.ndarray,
    temperature: float = 1.0,
    own_gate: np.ndarray | None = None,
    other_gate: np.ndarray | None = None,
) -> dict[str, float | None]:
    """AUROC of each score separating own (positive) from other images: 1.0 separates perfectly,
    0.5 is chance, below 0.5 ranks the foreign images as more familiar. With the graph's gate scores,
    `gate` (the shipped feature-space score, negated: higher = more familiar) is ranked beside them."""
    from sklearn.metrics import roc_auc_score

    if not len(own) or not len(other):
        return dict.fromkeys(SCORES)
    a, b = ood_scores(own, temperature), ood_scores(other, temperature)
    y = np.r_[np.ones(len(own)), np.zeros(len(other))]
    out = {s: round(float(roc_auc_score(y, np.r_[a[s], b[s]])), 4) for s in SCORES}
    if own_gate is not None and other_gate is not None and len(own_gate) and len(other_gate):
        out["gate"] = round(float(roc_auc_score(y, -np.r_[own_gate, other_gate])), 4)
    return out


def rule(predictor: Predictor) -> dict | None:
    """The abstention rule the model carries in its metadata, or None."""
    text = predictor.metadata.get(RULE_KEY)
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def criteria(groups: dict[str, dict], alpha: float) -> dict:
    """The issue's bars, each with its figure and whether it holds."""
    out = {}
    floor = round(1 - alpha - SLACK, 4)
    kept = groups["own_test"]["kept"]
    out["own_test_kept"] = {"value": kept, "at_least": floor, "holds": kept is not None and kept >= floor}
    for name, g in groups.items():
        if name == "own_test":
            continue
        bar = FAR_OOD if name in SYNTHETIC else MOST
        v = g["abstained"]
        ok = v is not None and (v >= bar if name in SYNTHETIC else v > bar)
        out[f"{name}_abstained"] = {
            "value": v,
            ("at_least" if name in SYNTHETIC else "more_than"): bar,
            "holds": ok,
        }
    out["all_hold"] = all(c["holds"] for c in out.values())
    return out


def measure(predictor: Predictor, own: Scored, foreign: dict[str, list[Path]], s: Settings) -> dict:
    """Every figure of one model: own test images (already scored), foreign sets, synthetic kinds."""
    r = rule(predictor)
    alpha = float(r.get("alpha", DEFAULT_ALPHA)) if r else DEFAULT_ALPHA
    temperature = float(r.get("temperature", 1.0)) if r else 1.0
    scored = {"own_test": own}
    for name, paths in foreign.items():
        scored[name] = score_files(predictor, paths)
    for kind in SYNTHETIC:
        scored[kind] = score_bytes(predictor, synthetic(kind, s.per_kind))
    groups = {k: {**figures(v.predictions, v.labels), "wall_s": v.wall_s} for k, v in scored.items()}
    separation = {
        k: aurocs(own.logits, v.logits, 1.0, own.gate, v.gate) for k, v in scored.items() if k != "own_test"
    }
    out = {
        "rule": {"present": r is not None, "alpha": alpha, **({"metadata": r} if r else {})},
        "groups": groups,
        "auroc": separation,
        "best_score": best_score(separation),
        "criteria": criteria(groups, alpha),
    }
    if temperature != 1.0:
        out["auroc_at_rule_temperature"] = {
            k: aurocs(own.logits, v.logits, temperature) for k, v in scored.items() if k != "own_test"
        }
    return out


def best_score(separation: dict[str, dict]) -> dict:
    """Each score's worst AUROC over the groups: the gate must work on every one of them."""
    names = [*SCORES, *(["gate"] if any("gate" in g for g in separation.values()) else [])]
    worst = {s: min((g[s] for g in separation.values() if g.get(s) is not None), default=None) for s in names}
    ranked = sorted((v, s) for s, v in worst.items() if v is not None)
    return {"worst_auroc": worst, "best": ranked[-1][1] if ranked else None}


# --- training, as a user does -----------------------------------------------------------------------


def train(name: str, data: Path, project: Path, s: Settings) -> dict:
    """`headstart run --data DATA` in a fresh project folder; returns the wall time and the model."""
    project.mkdir(parents=True)
    shutil.copyfile(ROOT / "params.yaml", project / "params.yaml")
    headstart = str(Path(sys.executable).parent / "headstart")
    sets = [x for o in (*s.overrides, f"register.model_name=abstention-{name}") for x in ("--set", o)]
    start = time.perf_counter()
    proc = subprocess.run(
        [headstart, "run", "--data", str(data), *sets],
        cwd=project,
        env={**os.environ, **TELEMETRY_OFF},
        capture_output=True,
        text=True,
    )
    wall = round(time.perf_counter() - start, 1)
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(f"headstart run on {name} failed (exit {proc.returncode}):\n{tail}")
    return {"wall_s": wall, "model": project / "artifacts" / "export" / "model.onnx"}


def own_test(project: Path, data: Path) -> tuple[list[Path], list[str]]:
    """The test split of validate's manifest: paths and true labels."""
    frame = pd.read_parquet(project / "artifacts" / "validate" / "manifest.parquet")
    rows = frame[frame["split"] == "test"]
    return [data / p for p in rows["path"]], list(rows["label"])


def foreign_images(root: Path, limit: int | None, seed: int = 0) -> list[Path]:
    """A data set's image files, all or a seeded sample of `limit`, in a fixed order."""
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    if limit is not None and len(paths) > limit:
        keep = np.random.default_rng(seed).choice(len(paths), limit, replace=False)
        paths = [paths[i] for i in sorted(keep)]
    return paths


def source(name: str) -> str:
    """The images a data set comes from: elpv-type and elpv-defect share them."""
    return name.split("-")[0]


def run_dataset(name: str, foreign: list[str], data: dict[str, Path], work: Path, s: Settings) -> dict:
    trained = train(name, data[name], work / "projects" / name, s)
    predictor = Predictor(trained["model"])
    paths, labels = own_test(work / "projects" / name, data[name])
    shown = {f: foreign_images(data[f], s.max_foreign) for f in foreign if source(f) != source(name)}
    start = time.perf_counter()
    result = measure(predictor, score_files(predictor, paths, labels), shown, s)
    evaluated = json.loads((work / "projects" / name / "artifacts" / "evaluate" / "metrics.json").read_text())
    return {
        "dataset": name,
        "classes": predictor.classes,
        "model_kind": evaluated.get("model_kind"),
        "evaluate_accuracy": evaluated.get("accuracy"),
        "providers": predictor.providers,
        "train_wall_s": trained["wall_s"],
        "measure_wall_s": round(time.perf_counter() - start, 1),
        **result,
    }


def markdown(report: dict) -> str:
    """One row per model and group: the README's table."""
    lines = [
        "| model | shown | images | kept | abstained (ood / ambiguous) | accuracy kept | bar | holds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in report["datasets"]:
        for group, g in run["groups"].items():
            c = run["criteria"][f"{group}_kept" if group == "own_test" else f"{group}_abstained"]
            what = "kept" if group == "own_test" else "abstained"
            bar = f">= {c['at_least']} {what}" if "at_least" in c else f"> {c['more_than']} {what}"
            why = g["by_reason"]
            lines.append(
                f"| {run['dataset']} | {group} | {g['images'] - g['unreadable']} | {fmt(g['kept'])} | "
                f"{fmt(g['abstained'])} ({fmt(why.get('out_of_distribution', 0))} / "
                f"{fmt(why.get('ambiguous', 0))}) | {fmt(g.get('accuracy_kept'))} | {bar} | "
                f"{'yes' if c['holds'] else 'NO'} |"
            )
    lines += ["", "| model | AUROC vs | " + " | ".join(AUROC_NAMES.values()) + " |"]
    lines.append("|---|---|" + "---|" * len(AUROC_NAMES))
    for run in report["datasets"]:
        for group, a in run["auroc"].items():
            cells = " | ".join(fmt(a.get(k)) for k in AUROC_NAMES)
            lines.append(f"| {run['dataset']} | {group} | {cells} |")
    return "\n".join(lines) + "\n"


AUROC_NAMES = {
    "msp": "max softmax",
    "max_logit": "max logit",
    "energy": "energy",
    "gate": "shipped gate (features)",
}


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="head only, 300 foreign images: the plumbing")
    ap.add_argument(
        "--datasets", nargs="+", default=["elpv-type", "lfw"], choices=DATASETS, help="train on these"
    )
    ap.add_argument(
        "--foreign",
        nargs="+",
        choices=DATASETS,
        help="show each model these (default: elpv-type, lfw, --datasets)",
    )
    ap.add_argument("--per-kind", type=int, help="synthetic images of each kind (default 200)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--markdown", type=Path, help="write the table to this Markdown file")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else FULL
    s = Settings(args.per_kind or s.per_kind, s.max_foreign, (*s.overrides, *args.overrides))
    foreign = args.foreign or list(dict.fromkeys(["elpv-type", "lfw", *args.datasets]))
    report = {"benchmark": "abstention", "mode": "quick" if args.quick else "full", "settings": s.__dict__}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = {n: materialise(n, work / "data" / n) for n in dict.fromkeys([*args.datasets, *foreign])}
        report["datasets"] = [run_dataset(n, foreign, data, work, s) for n in args.datasets]
    report["all_hold"] = all(r["criteria"]["all_hold"] for r in report["datasets"])
    report["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2, default=str))
    print(markdown(report), file=sys.stderr)
    if args.markdown:
        args.markdown.write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
