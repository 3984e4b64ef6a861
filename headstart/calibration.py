"""Calibrated abstention: fitted on held-out logits, shipped in the ONNX metadata, applied by every runtime.

Three parts, each from the held-out logits and labels: a temperature T (minimises the NLL), a
split-conformal threshold on 1 - p_true (prediction sets that hold the true class with probability
>= 1 - alpha, on average over calibration draws), and an energy gate E = -T logsumexp(z / T) at the same
finite-sample quantile of the held-out energies (at most alpha of in-distribution images rejected).
numpy only at import: headstart.runtime applies the rule without torch or scipy.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from headstart import HeadstartError

FORMAT = "headstart.abstention/1"
METADATA_KEY = "headstart.abstention"
OUT_OF_DISTRIBUTION, AMBIGUOUS = "out_of_distribution", "ambiguous"
REASONS = (OUT_OF_DISTRIBUTION, AMBIGUOUS)
T_BOUNDS = (0.05, 20.0)  # wider than any sane network's miscalibration; a bound hit is reported


@dataclass(frozen=True)
class AbstentionRule:
    """What ships in the metadata. A class is in an image's prediction set when its calibrated
    probability is >= 1 - set_threshold; energy_threshold None: the gate is off (too few images)."""

    temperature: float
    alpha: float
    set_threshold: float
    energy_threshold: float | None
    n_classes: int
    n_calibration: int
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str | Path = "rule") -> AbstentionRule:
        """The rule in `text`, checked field by field; anything else is one line naming `source`."""
        try:
            d = json.loads(text)
            rule = cls(**d) if isinstance(d, dict) else None
            ok = rule is not None and rule.format == FORMAT and _valid(rule)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise HeadstartError(
                f"{source}: metadata {METADATA_KEY} is not a valid abstention rule ({FORMAT}: "
                "temperature > 0, 0 < alpha < 1, 0 <= set_threshold <= 1, energy_threshold finite or null, "
                "n_classes >= 2); "
                "run calibrate and export again"
            )
        return rule


def read_rule(path: Path) -> AbstentionRule:
    """The rule in calibrate's abstention.json, checked as a runtime checks it."""
    try:
        d = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise HeadstartError(
            f"{path}: unreadable ({type(exc).__name__}); run the calibrate stage again"
        ) from None
    return AbstentionRule.from_json(json.dumps(d.get("rule") if isinstance(d, dict) else None), path)


def _valid(r: AbstentionRule) -> bool:
    def num(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (r.n_classes, r.n_calibration))
    return (
        num(r.temperature)
        and r.temperature > 0
        and num(r.alpha)
        and 0 < r.alpha < 1
        and num(r.set_threshold)
        and 0 <= r.set_threshold <= 1
        and (r.energy_threshold is None or num(r.energy_threshold))
        and ints
        and r.n_classes >= 2
        and r.n_calibration >= 0
    )


@dataclass
class Applied:
    """The rule's answer for a batch: calibrated probabilities (n, k), prediction sets (n, k bool),
    abstain (n,) and the reason per row (None when it answers)."""

    probabilities: np.ndarray
    sets: np.ndarray
    energy: np.ndarray
    abstain: np.ndarray
    reasons: list[str | None]


def apply(rule: AbstentionRule, logits: np.ndarray) -> Applied:
    """The one function that applies a rule: out_of_distribution (energy above the threshold) is
    checked first, then ambiguous (the prediction set does not hold exactly one class)."""
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[1] != rule.n_classes:
        raise HeadstartError(f"abstention rule for {rule.n_classes} classes given logits of shape {z.shape}")
    probs = softmax(z / rule.temperature)
    sets = (1.0 - probs) <= rule.set_threshold
    e = energy(z, rule.temperature)
    ood = np.zeros(len(z), bool) if rule.energy_threshold is None else e > rule.energy_threshold
    ambiguous = sets.sum(1) != 1
    reasons = [
        OUT_OF_DISTRIBUTION if o else AMBIGUOUS if a else None for o, a in zip(ood, ambiguous, strict=True)
    ]
    return Applied(probs, sets, e, ood | ambiguous, reasons)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """E = -T logsumexp(z / T): low for inputs like the training data, high far from it."""
    z = np.asarray(logits, np.float64) / temperature
    m = z.max(axis=1)
    return -temperature * (m + np.log(np.exp(z - m[:, None]).sum(1)))


def conformal_quantile(scores: np.ndarray, alpha: float) -> float | None:
    """The finite-sample split-conformal quantile: the ceil((n+1)(1-alpha))-th smallest score; None
    when n is too small for it (n < (1-alpha)/alpha: no finite threshold keeps the guarantee)."""
    n = len(scores)
    k = math.ceil((n + 1) * (1 - alpha))
    if k > n:
        return None
    return float(np.sort(np.asarray(scores, np.float64))[k - 1])


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    z = np.asarray(logits, np.float64) / temperature
    m = z.max(1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(1))
    return float(np.mean(lse - z[np.arange(len(z)), labels])) if len(z) else float("nan")


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence, equal-width bins."""
    if not len(probs):
        return float("nan")
    conf, hit = probs.max(1), probs.argmax(1) == labels
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return float(
        sum(
            abs(hit[which == b].mean() - conf[which == b].mean()) * (which == b).mean()
            for b in range(bins)
            if (which == b).any()
        )
    )


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """T minimising the held-out NLL, searched over log T within T_BOUNDS (1 with no images)."""
    from scipy.optimize import minimize_scalar

    if not len(labels):
        return 1.0
    lo, hi = np.log(T_BOUNDS)
    res = minimize_scalar(lambda t: nll(logits, labels, math.exp(t)), bounds=(lo, hi), method="bounded")
    return float(math.exp(res.x))


def fit(logits: np.ndarray, labels: np.ndarray, alpha: float, source: str) -> tuple[AbstentionRule, dict]:
    """The rule fitted on held-out logits (n, k) and labels, and its report (T, NLL and ECE before
    and after, n, where the images came from, and the rule's figures on the same images)."""
    z, y = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    t = fit_temperature(z, y)
    probs = softmax(z / t)
    q = conformal_quantile(1.0 - probs[np.arange(len(y)), y], alpha)
    e_q = conformal_quantile(energy(z, t), alpha)
    rule = AbstentionRule(t, alpha, 1.0 if q is None else min(q, 1.0), e_q, z.shape[1], len(y))
    report = {
        "source": source,
        "n": len(y),
        "alpha": alpha,
        "temperature": t,
        "temperature_at_bound": bool(min(abs(t - b) / b for b in T_BOUNDS) < 1e-3) if len(y) else False,
        "nll_before": nll(z, y),
        "nll_after": nll(z, y, t),
        "ece_before": ece(softmax(z), y),
        "ece_after": ece(probs, y),
        "too_few": _too_few(len(y), alpha) if q is None else None,
        "held_out": selective(rule, z, y),
    }
    return rule, report


def _too_few(n: int, alpha: float) -> str:
    need = math.ceil((1 - alpha) / alpha)
    return (
        f"{n} held-out images are too few for the conformal quantile at alpha={alpha} (need {need}): "
        "every prediction set holds every class (every image abstains as ambiguous) and the energy "
        "gate is off"
    )


def selective(rule: AbstentionRule, logits: np.ndarray, labels: np.ndarray) -> dict:
    """The rule on labelled logits: set coverage, abstention rate by reason, accuracy on kept images."""
    a = apply(rule, logits)
    y = np.asarray(labels, np.int64)
    n, kept = len(y), ~a.abstain
    hit = a.probabilities.argmax(1) == y
    rate = {r: (sum(x == r for x in a.reasons) / n if n else None) for r in REASONS}
    return {
        "n": n,
        "coverage": float(a.sets[np.arange(n), y].mean()) if n else None,
        "mean_set_size": float(a.sets.sum(1).mean()) if n else None,
        "abstention_rate": float(a.abstain.mean()) if n else None,
        "abstention_by_reason": rate,
        "kept": int(kept.sum()),
        "accuracy": float(hit.mean()) if n else None,
        "selective_accuracy": float(hit[kept].mean()) if kept.any() else None,
    }


def far_out_rate(rule: AbstentionRule, logits: np.ndarray) -> dict:
    """The rule on images with no label among the classes (noise, flat colours, another data set)."""
    a = apply(rule, logits)
    n = len(a.reasons)
    return {
        "n": n,
        "abstention_rate": float(a.abstain.mean()) if n else None,
        **{f"rate_{r}": (sum(x == r for x in a.reasons) / n if n else None) for r in REASONS},
    }


def to_markdown(d: dict) -> str:
    """calibrate's summary: what the rule was fitted on and what it does there."""
    r, h = d["report"], d["report"]["held_out"]
    lines = [
        "# Abstention rule",
        "",
        f"Fitted on {r['n']} held-out images ({r['source']}), alpha = {r['alpha']}.",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| NLL | {r['nll_before']:.4f} | {r['nll_after']:.4f} |",
        f"| ECE | {r['ece_before']:.4f} | {r['ece_after']:.4f} |",
        "",
        f"Temperature {r['temperature']:.4f}; set threshold {d['rule']['set_threshold']:.4f}; "
        f"energy threshold {d['rule']['energy_threshold']}.",
        "",
        f"On the same images: {selective_line(h)}.",
    ]
    if r["too_few"]:
        lines += ["", f"**{r['too_few']}**"]
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def selective_line(s: dict) -> str:
    """selective()'s figures in one line (evaluate's summary), with far_out's when present."""
    by = s["abstention_by_reason"]
    far = "".join(
        f"; on {f['n']} made {k} images {_pct(f['abstention_rate'])}" for k, f in s.get("far_out", {}).items()
    )
    return (
        f"set coverage {_pct(s['coverage'])}; abstained {_pct(s['abstention_rate'])} (out of distribution "
        f"{_pct(by[OUT_OF_DISTRIBUTION])}, ambiguous {_pct(by[AMBIGUOUS])}); accuracy on the {s['kept']} "
        f"kept of {s['n']} images {_pct(s['selective_accuracy'])} (all: {_pct(s['accuracy'])})" + far
    )


def run_metrics(calibrated: dict | None, test: dict | None) -> dict[str, float]:
    """calibrate's abstention.json and evaluate's `abstention` figures as flat MLflow metrics."""
    out: dict[str, float] = {}
    if calibrated:
        r = calibrated["report"]
        out |= {f"calibrate.{k}": r[k] for k in ("n", "temperature", "nll_before", "nll_after")}
        out |= {f"calibrate.{k}": r[k] for k in ("ece_before", "ece_after")}
        out |= {f"calibrate.held_out_{k}": v for k, v in _flat(r["held_out"]).items()}
    for kind, f in (test or {}).get("far_out", {}).items():
        out[f"test_abstention.far_out_{kind}_rate"] = f["abstention_rate"]
    return out | {f"test_abstention.{k}": v for k, v in _flat(test or {}).items()}


def _flat(s: dict) -> dict[str, float]:
    by = s.get("abstention_by_reason") or {}
    both = {k: v for k, v in s.items() if k != "abstention_by_reason"}
    both |= {f"rate_{k}": v for k, v in by.items()}
    return {k: v for k, v in both.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def far_out_images(size: int, channels: int, n: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Images no classifier of real data should answer, at the model's input size (uint8 HWC):
    uniform noise and flat colours (black, white, grey and random ones)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    colours = np.concatenate(
        [[[0] * channels, [255] * channels, [128] * channels], rng.integers(0, 256, (n - 3, channels))]
    )
    flat = np.broadcast_to(colours[:, None, None, :], (n, size, size, channels)).astype(np.uint8)
    return {"noise": noise, "flat": flat}
