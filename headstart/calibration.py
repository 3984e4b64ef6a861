"""Calibrated abstention: fitted on held-out logits, shipped in the ONNX metadata, applied by every runtime.

Three parts, each from held-out images: a temperature T (minimises the NLL of the logits, with the
rule of succession's 1/(n+2) left to the other classes, so separable data cannot sharpen it without
bound), a
split-conformal threshold on 1 - p_true (prediction sets that hold the true class with probability
>= 1 - alpha, on average over calibration draws; the argmax is always in the set), and an
out-of-distribution gate at the finite-sample (1 - ood_alpha) quantile of the held-out scores (at most
ood_alpha of in-distribution images rejected). The gate's score is FeatureGate's, on the pooled
penultimate features, computed inside the exported graph (output `ood_score`): the energy of the logits
ranked other data sets as more familiar than the model's own images (docs/ood_scores.md). The energy
E = -T logsumexp(z / T) remains the fallback when the feature gate cannot be fitted.
numpy only: headstart.runtime applies the rule, and calibrate fits it, without torch, scipy or sklearn.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from headstart import HeadstartError
from headstart.metrics import ci_metrics, counted, interval_fields

FORMAT = "headstart.abstention/2"
OLD_FORMATS = ("headstart.abstention/1",)  # energy gate only: still loads
OOD_SCORE, OOD_OUTPUT = "mahalanobis_ppca_unit", "ood_score"
OOD_K = 32  # the study's k: every bar met on elpv and lfw, ~170 KiB of constants for Lite0
METADATA_KEY = "headstart.abstention"
OUT_OF_DISTRIBUTION, AMBIGUOUS = "out_of_distribution", "ambiguous"
REASONS = (OUT_OF_DISTRIBUTION, AMBIGUOUS)
T_BOUNDS = (0.05, 20.0)  # wider than any sane network's miscalibration; a bound hit is reported


@dataclass(frozen=True)
class AbstentionRule:
    """What ships in the metadata. A class is in an image's prediction set when its calibrated
    probability is >= 1 - set_threshold (its argmax always is); `ood`: the feature gate ({score, k,
    output, threshold, alpha}: reject when the graph's `output` exceeds `threshold`); without it the
    energy gate (energy_threshold; None as well: no gate, too few images)."""

    temperature: float
    alpha: float
    set_threshold: float
    energy_threshold: float | None
    n_classes: int
    n_calibration: int
    format: str = FORMAT
    ood: dict | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str | Path = "rule") -> AbstentionRule:
        """The rule in `text`, checked field by field; anything else is one line naming `source`."""
        try:
            d = json.loads(text)
            rule = cls(**d) if isinstance(d, dict) else None
            ok = rule is not None and rule.format in (FORMAT, *OLD_FORMATS) and _valid(rule)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise HeadstartError(
                f"{source}: metadata {METADATA_KEY} is not a valid abstention rule ({FORMAT}: "
                "temperature > 0, 0 < alpha < 1, 0 <= set_threshold <= 1, energy_threshold finite or null, "
                "n_classes >= 2, ood null or {score, k, output, threshold, alpha}); "
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
    return rule_in(d, path)


def rule_in(d, source: str | Path) -> AbstentionRule:
    """The rule in abstention.json's content `d` (already read), checked as read_rule checks it."""
    return AbstentionRule.from_json(json.dumps(d.get("rule") if isinstance(d, dict) else None), source)


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
        and (r.ood is None or (r.format == FORMAT and _valid_ood(r.ood, num)))
    )


def _valid_ood(ood, num) -> bool:
    return (
        isinstance(ood, dict)
        and set(ood) == {"score", "k", "output", "threshold", "alpha"}
        and ood["score"] == OOD_SCORE
        and isinstance(ood["k"], int)
        and not isinstance(ood["k"], bool)
        and ood["k"] >= 1
        and isinstance(ood["output"], str)
        and bool(ood["output"])
        and num(ood["threshold"])
        and num(ood["alpha"])
        and 0 < ood["alpha"] < 1
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


def apply(rule: AbstentionRule, logits: np.ndarray, ood_score: np.ndarray | None = None) -> Applied:
    """The one function that applies a rule: out_of_distribution (the feature gate's score, the
    graph's `ood_score` output, above its threshold; or the fallback energy gate) is checked first,
    then ambiguous (the prediction set holds more than one class). The argmax is always in the set:
    an empty set is a confident model at an alpha above its error rate, and adding a class only raises
    coverage, so the guarantee holds."""
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[1] != rule.n_classes:
        raise HeadstartError(f"abstention rule for {rule.n_classes} classes given logits of shape {z.shape}")
    probs = softmax(z / rule.temperature)
    sets = (1.0 - probs) <= rule.set_threshold
    sets[np.arange(len(z)), probs.argmax(1)] = True
    e = energy(z, rule.temperature)
    ood = _out(rule, e, ood_score, len(z))
    ambiguous = sets.sum(1) > 1
    reasons = [
        OUT_OF_DISTRIBUTION if o else AMBIGUOUS if a else None for o, a in zip(ood, ambiguous, strict=True)
    ]
    return Applied(probs, sets, e, ood | ambiguous, reasons)


def _out(rule: AbstentionRule, e: np.ndarray, ood_score: np.ndarray | None, n: int) -> np.ndarray:
    if rule.ood is None:
        return np.zeros(n, bool) if rule.energy_threshold is None else e > rule.energy_threshold
    if ood_score is None:
        raise HeadstartError(
            f"the abstention rule's gate reads the model's {rule.ood['output']!r} output and none was given"
        )
    s = np.asarray(ood_score, np.float64).reshape(-1)
    if len(s) != n:
        raise HeadstartError(f"{len(s)} ood scores for {n} rows of logits")
    return ~(s <= rule.ood["threshold"])  # NaN is out: a score that cannot be computed is no evidence


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


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, off_true: float = 0.0) -> float:
    """Mean cross-entropy of softmax(logits / T) against targets that put `off_true` of their mass on
    the other classes (evenly) and the rest on the label; off_true 0: the plain NLL."""
    z = np.asarray(logits, np.float64) / temperature
    if not len(z):
        return float("nan")
    m = z.max(1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(1))
    true = z[np.arange(len(z)), labels]
    others = (z.sum(1) - true) / max(z.shape[1] - 1, 1)
    return float(np.mean(lse - (1 - off_true) * true - off_true * others))


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
    """T minimising the held-out NLL against targets that leave 1/(n+2) to the other classes, searched
    over log T within T_BOUNDS (1 with no images). With n held-out images all right, the chance that
    the next is wrong is about 1/(n+2) (Laplace's rule of succession), not 0: without it, a perfectly
    separated held-out set drives T to its lower bound and any wrong answer then reads 0.99+."""
    if not len(labels):
        return 1.0
    lo, hi = np.log(T_BOUNDS)
    off = 1.0 / (len(labels) + 2)
    return float(math.exp(minimize_bounded(lambda t: nll(logits, labels, math.exp(t), off), lo, hi)))


def minimize_bounded(
    f: Callable[[float], float], lo: float, hi: float, xatol: float = 1e-5, maxiter: int = 500
) -> float:
    """x in [lo, hi] minimising f: Brent's bounded method, a line-for-line port of scipy's BSD-licensed
    `_minimize_scalar_bounded` (scipy/optimize/_optimize.py, what minimize_scalar(method="bounded")
    runs), so the same x comes out; scipy.optimize itself costs the flow's process ~26 MB it keeps to
    the end. Stops after `maxiter` evaluations of f."""
    sqrt_eps, golden_mean = math.sqrt(2.2e-16), 0.5 * (3.0 - math.sqrt(5.0))
    a, b = lo, hi
    fulc = a + golden_mean * (b - a)
    nfc, xf = fulc, fulc
    rat = e = 0.0
    fx = f(xf)
    num = 1
    ffulc = fnfc = fx
    xm = 0.5 * (a + b)
    tol1 = sqrt_eps * np.abs(xf) + xatol / 3.0
    tol2 = 2.0 * tol1
    while np.abs(xf - xm) > (tol2 - 0.5 * (b - a)):
        golden = True
        if np.abs(e) > tol1:  # try a parabola through the three best points
            golden = False
            r = (xf - nfc) * (fx - ffulc)
            q = (xf - fulc) * (fx - fnfc)
            p = (xf - fulc) * q - (xf - nfc) * r
            q = 2.0 * (q - r)
            if q > 0.0:
                p = -p
            q = np.abs(q)
            r, e = e, rat
            if np.abs(p) < np.abs(0.5 * q * r) and q * (a - xf) < p < q * (b - xf):
                rat = (p + 0.0) / q
                x = xf + rat
                if (x - a) < tol2 or (b - x) < tol2:
                    rat = tol1 * (np.sign(xm - xf) + ((xm - xf) == 0))
            else:
                golden = True
        if golden:
            e = a - xf if xf >= xm else b - xf
            rat = golden_mean * e
        x = xf + (np.sign(rat) + (rat == 0)) * np.maximum(np.abs(rat), tol1)
        fu = f(x)
        num += 1
        if fu <= fx:
            a, b = (xf, b) if x >= xf else (a, xf)
            fulc, ffulc, nfc, fnfc, xf, fx = nfc, fnfc, xf, fx, x, fu
        else:
            a, b = (x, b) if x < xf else (a, x)
            if fu <= fnfc or nfc == xf:
                fulc, ffulc, nfc, fnfc = nfc, fnfc, x, fu
            elif fu <= ffulc or fulc == xf or fulc == nfc:
                fulc, ffulc = x, fu
        xm = 0.5 * (a + b)
        tol1 = sqrt_eps * np.abs(xf) + xatol / 3.0
        tol2 = 2.0 * tol1
        if num >= maxiter:
            break
    return xf


def fit(
    logits: np.ndarray,
    labels: np.ndarray,
    alpha: float,
    source: str,
    ood_scores: np.ndarray | None = None,
    ood_alpha: float | None = None,
    k: int | None = None,
) -> tuple[AbstentionRule, dict]:
    """The rule fitted on held-out logits (n, k) and labels and, when the feature gate was fitted
    (k its dimension), the held-out images' gate scores; and its report (T, NLL and ECE before and
    after, n, where the images came from, and the rule's figures on the same images). The gate
    rejects at most `ood_alpha` (default `alpha`) of in-distribution images."""
    z, y = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    ood_alpha = alpha if ood_alpha is None else ood_alpha
    t = fit_temperature(z, y)
    probs = softmax(z / t)
    q = conformal_quantile(1.0 - probs[np.arange(len(y)), y], alpha)
    tau = None if ood_scores is None else conformal_quantile(ood_scores, ood_alpha)
    ood = None if tau is None else {"score": OOD_SCORE, "k": k, "output": OOD_OUTPUT, "threshold": tau}
    ood = None if ood is None else ood | {"alpha": ood_alpha}
    e_q = None if ood else conformal_quantile(energy(z, t), ood_alpha)
    n_classes = z.shape[1]
    rule = AbstentionRule(t, alpha, 1.0 if q is None else min(q, 1.0), e_q, n_classes, len(y), ood=ood)
    report = {
        "source": source,
        "n": len(y),
        "alpha": alpha,
        "ood_alpha": ood_alpha,
        "gate": "feature" if ood else "energy" if e_q is not None else "none",
        "temperature": t,
        "temperature_at_bound": bool(min(abs(t - b) / b for b in T_BOUNDS) < 1e-3) if len(y) else False,
        "nll_before": nll(z, y),
        "nll_after": nll(z, y, t),
        "ece_before": ece(softmax(z), y),
        "ece_after": ece(probs, y),
        "too_few": _too_few(len(y), min(alpha, ood_alpha))
        if q is None or (ood is None and e_q is None)
        else None,
        "held_out": selective(rule, z, y, ood_scores),
    }
    return rule, report


def _too_few(n: int, alpha: float) -> str:
    need = math.ceil((1 - alpha) / alpha)
    return (
        f"{n} held-out images are too few for the conformal quantile at alpha={alpha} (need {need}): "
        "at the set's alpha every prediction set holds every class (every image abstains as ambiguous); "
        "at the gate's, the out-of-distribution gate is off"
    )


def selective(
    rule: AbstentionRule, logits: np.ndarray, labels: np.ndarray, ood_score: np.ndarray | None = None
) -> dict:
    """The rule on labelled logits (and their gate scores): set coverage, abstention rate by reason,
    accuracy on kept images."""
    a = apply(rule, logits, ood_score)
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
        "majority_rate": float(np.bincount(y).max() / n) if n else None,  # always the largest class
        "selective_accuracy": float(hit[kept].mean()) if kept.any() else None,
    }


def kept_interval(s: dict, n: int, confidence: float, seed: int) -> dict:
    """selective()'s figures with the bootstrap CI of the accuracy on the kept images
    (`selective_accuracy_ci`, None when none was kept)."""
    hits = counted(round((s["selective_accuracy"] or 0.0) * s["kept"]), s["kept"])
    return s | interval_fields("selective_accuracy", hits, n, confidence, seed)


def far_out_rate(rule: AbstentionRule, logits: np.ndarray, ood_score: np.ndarray | None = None) -> dict:
    """The rule on images with no label among the classes (noise, flat colours, another data set)."""
    a = apply(rule, logits, ood_score)
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
        f"{gate_line(d['rule'])}.",
        "",
        f"On the same images: {selective_line(h)}.",
    ]
    if r["too_few"]:
        lines += ["", f"**{r['too_few']}**"]
    return "\n".join(lines) + "\n"


def gate_line(rule: dict) -> str:
    """The out-of-distribution gate of a rule (its JSON dict) in words."""
    ood = rule.get("ood")
    if ood:
        return (
            f"out-of-distribution gate: {ood['score']} (k = {ood['k']}) on the pooled features, graph "
            f"output {ood['output']!r}, threshold {ood['threshold']:.4g} at alpha {ood['alpha']}"
        )
    if rule.get("energy_threshold") is not None:
        return f"out-of-distribution gate: energy (fallback), threshold {rule['energy_threshold']:.4g}"
    return "no out-of-distribution gate (too few held-out images)"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def selective_line(s: dict) -> str:
    """selective()'s figures in one line (evaluate's summary), with far_out's when present."""
    by, ci = s["abstention_by_reason"], s.get("selective_accuracy_ci")
    ci_part = f"{s['ci_confidence']:.0%} CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f}%; " if ci else ""
    far = "".join(
        f"; on {f['n']} made {k} images {_pct(f['abstention_rate'])}" for k, f in s.get("far_out", {}).items()
    )
    return (
        f"set coverage {_pct(s['coverage'])}; abstained {_pct(s['abstention_rate'])} (out of distribution "
        f"{_pct(by[OUT_OF_DISTRIBUTION])}, ambiguous {_pct(by[AMBIGUOUS])}); accuracy on the {s['kept']} "
        f"kept of {s['n']} images {_pct(s['selective_accuracy'])} ({ci_part}all: {_pct(s['accuracy'])})" + far
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
    both |= {f"rate_{k}": v for k, v in by.items()} | ci_metrics(s)
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


@dataclass
class FeatureGate:
    """The feature gate's constants (maha_ppca_unit of docs/ood_scores.md): for L2-normalised pooled
    features u, per class c with r = u - means[c] and p = r @ basis, s_c = sum(p^2 (1/eigenvalues -
    1/sigma2)) + |r|^2 / sigma2, a Mahalanobis distance whose shared within-class covariance is cut
    to its top k eigenvectors plus one isotropic variance for the rest; the score is min_c s_c. Its
    size, (C + k) d + k + 1 floats, does not grow with the training set."""

    means: np.ndarray  # (C, d): class means of the normalised training features
    basis: np.ndarray  # (d, k): top eigenvectors of the shrunk within-class covariance
    eigenvalues: np.ndarray  # (k,)
    sigma2: float  # the mean of the other d - k eigenvalues

    @property
    def k(self) -> int:
        return self.basis.shape[1]

    @property
    def weights(self) -> np.ndarray:
        return 1.0 / self.eigenvalues - 1.0 / self.sigma2

    def score(self, features: np.ndarray) -> np.ndarray:
        """(n,) scores of (n, d) pooled features: higher is stranger."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.means.shape[1]:
            raise HeadstartError(
                f"the out-of-distribution gate was fitted on {self.means.shape[1]} features per image but "
                f"the model gives {x.shape[1:]}: it belongs to another model; run the calibrate stage again"
            )
        r = unit(x)[:, None, :] - self.means[None]
        p = r @ self.basis
        return ((p**2) @ self.weights + (r**2).sum(-1) / self.sigma2).min(1)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, means=self.means, basis=self.basis, eigenvalues=self.eigenvalues, sigma2=self.sigma2)
        return buf.getvalue()


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; an all-zero row stays zero (no NaN for the gate to let through)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def gate_dimension(n: int, d: int, n_classes: int, k: int = OOD_K) -> int:
    """k for n training features of width d: at most d - 1 (one variance is left for the rest) and
    n - C (the within-class residuals span no more)."""
    return min(k, d - 1, n - n_classes)


def fit_gate(x: np.ndarray, y: np.ndarray, n_classes: int, k: int = OOD_K) -> tuple[FeatureGate | None, str]:
    """The gate fitted on training features and labels (Ledoit-Wolf on the within-class residuals of
    the normalised features), or None and why it cannot be (tiny d, too few images, a class without
    images, degenerate features): the rule then falls back to the energy gate."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.int64)
    k = gate_dimension(len(x), x.shape[1] if x.ndim == 2 else 0, n_classes, k)
    counts = np.bincount(y, minlength=n_classes) if len(y) else np.zeros(n_classes, int)
    if x.ndim != 2 or k < 1 or (counts == 0).any() or not np.isfinite(x).all():
        return None, (
            f"the feature gate needs training features of every class, more images than classes and "
            f"width >= 2 (got {len(x)} images, width {x.shape[-1] if x.ndim else 0}, class counts "
            f"{counts.tolist()})"
        )
    u = unit(x)
    means = np.stack([u[y == c].mean(0) for c in range(n_classes)])
    top, basis, sigma2 = top_eigen(u - means[y], k)
    if not (sigma2 > 0 and (top > 0).all() and np.isfinite(top).all()):
        return None, "the training features' within-class covariance is degenerate (all features alike)"
    return FeatureGate(means, basis, top, sigma2), f"fitted on {len(x)} images, k = {k}"


def top_eigen(r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The k largest eigenvalues of the Ledoit-Wolf covariance of rows `r` (taken as centred), their
    eigenvectors (p, k), and the mean of the other p - k eigenvalues. Fewer rows than features (few
    images of 1280 features): the covariance is (1 - s) R'R/n + s mu I, whose top eigenpairs come
    from the n x n Gram matrix (its eigenvectors carried through R'), the other eigenvalues are s mu,
    and nothing p x p is formed (64 images: 0.65 -> 0.01 s; the same figures within 1e-9, tested).
    Otherwise, or when the residuals span fewer than k directions, the full eigendecomposition."""
    n, p = r.shape
    if n < p and k < n:
        gram = r @ r.T / n
        w, v = np.linalg.eigh(gram)
        w, v = w[::-1][:k], v[:, ::-1][:, :k]
        if w[-1] > 1e-10 * max(w[0], 1e-300):
            s, mu = ledoit_wolf_shrinkage(r, gram)
            top = (1.0 - s) * w + s * mu
            basis = (r.T @ v) / np.sqrt(n * w)
            return top, basis, float((mu * p - top.sum()) / (p - k))
    values, vectors = np.linalg.eigh(ledoit_wolf(r)[0])
    return values[::-1][:k].copy(), vectors[:, ::-1][:, :k].copy(), float(values[: p - k].mean())


def ledoit_wolf_shrinkage(x: np.ndarray, gram: np.ndarray) -> tuple[float, float]:
    """ledoit_wolf's shrinkage and mu (the covariance's mean eigenvalue) from the rows' Gram matrix
    x x' / n rather than the p x p covariance: the same sums, ||x'x||^2 = ||x x'||^2."""
    n, p = x.shape
    norms2 = (x**2).sum(1)
    trace_sum = norms2.sum() / n
    mu = trace_sum / p
    delta_ = float(np.sum(gram**2))  # ||x'x / n||^2
    beta = 1.0 / (p * n) * (float(np.sum(norms2**2)) / n - delta_)
    delta = (delta_ - 2.0 * mu * trace_sum + p * mu**2) / p
    beta = min(beta, delta)
    return (0.0 if beta == 0 else beta / delta), float(mu)


def ledoit_wolf(x: np.ndarray, block_size: int = 1000) -> tuple[np.ndarray, float]:
    """The Ledoit-Wolf shrunk covariance of rows `x` taken as centred, and its shrinkage: scikit-learn's
    estimator (LedoitWolf(assume_centered=True)), with its block-wise sums in its order, so the same
    bits come out; sklearn.covariance costs the flow's process ~19 MB it keeps to the end."""
    x = np.asarray(x, np.float64)
    n, p = x.shape
    if p == 1:  # one feature: the same whatever the shrinkage
        return np.atleast_2d((x**2).mean()), 0.0
    x2 = x**2
    trace = np.sum(x2, axis=0) / n
    mu = np.sum(trace) / p
    full = p // block_size * block_size
    blocks = [slice(i, i + block_size) for i in range(0, full, block_size)] + [slice(full, None)]
    beta_ = delta_ = 0.0
    for rows in blocks:
        for cols in blocks:
            beta_ += np.sum(np.dot(x2.T[rows], x2[:, cols]))
            delta_ += np.sum(np.dot(x.T[rows], x[:, cols]) ** 2)
    delta_ /= n**2
    beta = 1.0 / (p * n) * (beta_ / n - delta_)
    delta = (delta_ - 2.0 * mu * trace.sum() + p * mu**2) / p
    beta = min(beta, delta)  # never shrink past the identity
    shrinkage = 0.0 if beta == 0 else beta / delta
    cov = np.dot(x.T, x) / n
    shrunk = (1.0 - shrinkage) * cov
    shrunk.flat[:: p + 1] += shrinkage * (np.sum(np.trace(cov)) / p)
    return shrunk, float(shrinkage)


def gate_file_bytes(gate: FeatureGate | None, why: str) -> bytes:
    """calibrate's ood_gate.npz: the constants export puts in the graph, or only why there are none."""
    if gate is not None:
        return gate.to_bytes()
    buf = io.BytesIO()
    np.savez(buf, why=np.array(why))
    return buf.getvalue()


def read_gate(path: Path) -> FeatureGate | None:
    """calibrate's ood_gate.npz: the fitted constants, or None when the rule fell back."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "means" not in z:
                return None
            gate = FeatureGate(z["means"], z["basis"], z["eigenvalues"], float(z["sigma2"]))
    except (OSError, ValueError, KeyError) as exc:
        raise HeadstartError(
            f"{path}: unreadable ({type(exc).__name__}); run the calibrate stage again"
        ) from None
    return gate
