"""LogME (You, Liu, Wang, Long, ICML 2021): how well a backbone's frozen features suit a labelled task,
from the features alone, without training a head.

Each class's one-vs-rest target y is modelled as a Bayesian linear regression on the features F (n x d):
a weight prior N(0, I/alpha), noise N(0, 1/beta). The marginal likelihood of y (the evidence) has a
closed form; maximising it over (alpha, beta) by MacKay's fixed-point iteration (the paper's
Algorithm 1) on the thin SVD of F costs O(n d min(n, d)) once plus O(min(n, d)) per step. LogME is the
maximised log evidence per sample, averaged over classes: higher is better.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_STEPS = 100  # converges in a handful; the bound only guards against a degenerate case
TOLERANCE = 1e-10  # relative change of alpha / beta at which the iteration stops
# added to |m|^2 and |F m - y|^2 in the updates, as in the reference code: a weak exponential hyperprior on
# alpha and beta that keeps them finite where the features fit a target exactly (n <= d, or a target in
# their span), where the plain evidence grows without bound as the noise vanishes
EPS = 1e-5


@dataclass(frozen=True)
class Spectrum:
    """F = U diag(s) V^T, thin: what the evidence of any target needs from the features."""

    u: np.ndarray  # (n, k), k = min(n, d)
    sigma: np.ndarray  # (k,) the squared singular values: eigenvalues of F^T F
    n: int
    d: int

    @classmethod
    def of(cls, features: np.ndarray) -> Spectrum:
        f = np.asarray(features, dtype=np.float64)
        u, s, _ = np.linalg.svd(f, full_matrices=False)
        return cls(u, s**2, *f.shape)


@dataclass(frozen=True)
class Fit:
    score: float  # LogME: mean over classes of the maximum log evidence per sample
    alphas: tuple[float, ...]  # per class (in sorted label order): the weights' prior precision
    betas: tuple[float, ...]  # per class: the noise precision


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The LogME score of `features` (n x d) for integer or string class `labels` (n,)."""
    return fit(features, labels).score


def fit(features: np.ndarray, labels: np.ndarray) -> Fit:
    """LogME with each class's maximising (alpha, beta)."""
    labels = np.asarray(labels)
    if len(labels) != len(features) or len(labels) < 2:
        raise ValueError(f"LogME needs one label per feature row and 2+ rows, got {features.shape}")
    spec = Spectrum.of(features)
    per_class = [maximise(spec, (labels == c).astype(np.float64)) for c in np.unique(labels)]
    evidence, alphas, betas = zip(*per_class, strict=True)
    return Fit(float(np.mean(evidence)), alphas, betas)


def maximise(spec: Spectrum, y: np.ndarray) -> tuple[float, float, float]:
    """(log evidence per sample, alpha, beta) at the maximum of `objective` for target y, by the
    fixed point gamma = sum beta s_i / (alpha + beta s_i), alpha = gamma / |m|^2,
    beta = (n - gamma) / |F m - y|^2 (with EPS added to both norms)."""
    z2, outside = _projections(spec, y)
    alpha = beta = 1.0
    for _ in range(MAX_STEPS):
        m2, res2 = _moments(spec, z2, outside, alpha / beta)
        gamma = float(np.sum(spec.sigma / (spec.sigma + alpha / beta)))
        new_alpha, new_beta = gamma / (m2 + EPS), (spec.n - gamma) / (res2 + EPS)
        done = abs(new_alpha - alpha) <= TOLERANCE * alpha and abs(new_beta - beta) <= TOLERANCE * beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return evidence(spec, y, alpha, beta), alpha, beta


def objective(spec: Spectrum, y: np.ndarray, alpha: float, beta: float) -> float:
    """What `maximise` maximises: the evidence per sample plus the log of EPS's hyperprior (up to a
    constant), which differ by EPS (alpha + beta) / 2n. Where the features cannot fit the target exactly
    (n > d, in general) both peak at nearly the same place; where they can, only this one has a finite
    maximum."""
    return evidence(spec, y, alpha, beta) - EPS * (alpha + beta) / (2 * spec.n)


def evidence(spec: Spectrum, y: np.ndarray, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) / n in closed form: log N(y | 0, I/beta + F F^T / alpha) / n, with
    m the posterior mean of the weights and A = alpha I + beta F^T F (whose d - k null directions
    keep eigenvalue alpha: the fast reference code omits their log alpha when n < d)."""
    z2, outside = _projections(spec, y)
    m2, res2 = _moments(spec, z2, outside, alpha / beta)
    n, d, k = spec.n, spec.d, len(spec.sigma)
    log_det_a = np.sum(np.log(alpha + beta * spec.sigma)) + (d - k) * np.log(alpha)
    total = (
        d / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - beta / 2 * res2
        - alpha / 2 * m2
        - log_det_a / 2
        - n / 2 * np.log(2 * np.pi)
    )
    return float(total / n)


def _projections(spec: Spectrum, y: np.ndarray) -> tuple[np.ndarray, float]:
    """(squared coordinates of y in F's column space, the squared norm of y outside it)."""
    z = spec.u.T @ y
    return z**2, max(float(y @ y - z @ z), 0.0)


def _moments(spec: Spectrum, z2: np.ndarray, outside: float, t: float) -> tuple[float, float]:
    """(|m|^2, |F m - y|^2) at t = alpha / beta, m = (F^T F + t I)^-1 F^T y, the posterior mean."""
    shrink = t / (t + spec.sigma)
    m2 = float(np.sum(spec.sigma * z2 / (t + spec.sigma) ** 2))
    return m2, float(np.sum(shrink**2 * z2)) + outside
