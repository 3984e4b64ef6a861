"""LogME against a worked example: the closed form equals the Gaussian marginal likelihood, the fixed point
is a maximum, a fixed example gives the authors' number, and separable features score higher."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from headstart.transferability import Spectrum, evidence, fit, logme, maximise, objective


def _example(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    features = rng.normal(size=(n, d)) + 1.5 * rng.normal(size=(3, d))[labels]
    return features, labels


@pytest.mark.parametrize(("n", "d"), [(30, 5), (8, 20)], ids=["n>d", "n<d"])
def test_closed_form_equals_the_gaussian_marginal_likelihood(n, d):
    features, labels = _example(n, d)
    spec = Spectrum.of(features)
    for c in range(3):
        y = (labels == c).astype(np.float64)
        _, alpha, beta = maximise(spec, y)
        cov = np.eye(n) / beta + features @ features.T / alpha
        direct = multivariate_normal(np.zeros(n), cov).logpdf(y) / n
        assert evidence(spec, y, alpha, beta) == pytest.approx(direct, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize(("n", "d"), [(30, 5), (12, 40)], ids=["n>d", "n<d"])
def test_the_fixed_point_is_a_maximum(n, d):
    """Of the evidence where the features cannot fit the target exactly (n > d); where they can
    (n < d), the evidence grows as the noise vanishes, and the hyperprior's objective has the maximum."""
    features, labels = _example(n, d, seed=1)
    spec = Spectrum.of(features)
    y = (labels == 0).astype(np.float64)
    found, alpha, beta = maximise(spec, y)
    assert found == evidence(spec, y, alpha, beta)
    score = evidence if n > d else objective
    best = score(spec, y, alpha, beta)
    for a, b in [(alpha * 1.1, beta), (alpha * 0.9, beta), (alpha, beta * 1.1), (alpha, beta * 0.9)]:
        assert score(spec, y, a, b) < best


def test_a_fixed_example_gives_the_authors_number():
    labels = np.arange(40) % 3
    i, j = np.meshgrid(np.arange(40), np.arange(6), indexing="ij")
    features = np.sin(1.3 * i * (j + 1) + 0.5 * j**2) + 0.8 * np.eye(3, 6)[labels]
    # LogME().fit(features, labels) of github.com/thuml/LogME (LogME.py at commit 56551ca, the
    # fixed-point version), run once with numba's njit replaced by the identity
    assert logme(features, labels) == pytest.approx(-0.8141918445966162, rel=1e-7)


def test_separating_features_score_higher_than_shuffled_ones():
    features, labels = _example(60, 16, seed=2)
    shuffled = np.random.default_rng(3).permutation(labels)
    assert logme(features, labels) > logme(features, shuffled) + 0.05


def test_string_labels_and_one_entry_per_class():
    features, labels = _example(30, 5)
    result = fit(features, np.array(["a", "b", "c"])[labels])
    assert len(result.alphas) == len(result.betas) == 3
    assert result.score == pytest.approx(logme(features, labels))
    with pytest.raises(ValueError, match="one label per feature row"):
        logme(features, labels[:-1])
