"""calibration's own Ledoit-Wolf and bounded Brent minimiser against scikit-learn's and scipy's, which
they replace so the calibrate stage leaves neither loaded in the flow's process."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from sklearn.covariance import LedoitWolf

from headstart import calibration
from headstart.calibration import T_BOUNDS, fit_gate, ledoit_wolf, minimize_bounded, nll


def rows(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, shape) @ np.diag(np.linspace(0.2, 3, shape[1]))


def sklearn_lw(x: np.ndarray, block_size: int = 1000) -> tuple[np.ndarray, float]:
    est = LedoitWolf(assume_centered=True, block_size=block_size).fit(x)
    return est.covariance_, est.shrinkage_


CASES = {
    "n > p": (rows((200, 12)), 1000),
    "n < p": (rows((15, 40), 1), 1000),
    "p == 1": (rows((30, 1), 2), 1000),
    "one row repeated": (np.repeat(rows((1, 6), 3), 9, axis=0), 1000),
    "a row repeated among others": (np.vstack([rows((10, 5), 4), np.repeat(rows((1, 5), 5), 6, 0)]), 1000),
    "blocks, small": (rows((25, 23), 6), 7),
    "blocks, default size": (rows((6, 1003), 7), 1000),
}


@pytest.mark.parametrize("case", CASES)
def test_ledoit_wolf_is_sklearns(case):
    x, block = CASES[case]
    ours, s = ledoit_wolf(x, block)
    theirs, s_ref = sklearn_lw(x, block)
    assert ours.shape == theirs.shape == (x.shape[1], x.shape[1])
    assert np.abs(ours - theirs).max() <= 1e-12 * np.abs(theirs).max()
    assert abs(s - s_ref) <= 1e-12 * max(abs(s_ref), 1e-300) or s == s_ref
    if case == "n < p":
        assert 0 < s < 1  # the case really shrinks: a wrong shrinkage would show


def test_fit_gate_is_unchanged_from_the_sklearn_path(monkeypatch):
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 30)
    x = rng.normal(0, 1, (90, 48)) + 2 * rng.normal(0, 1, (3, 48))[y]
    ours, why = fit_gate(x, y, 3, k=8)
    monkeypatch.setattr(calibration, "ledoit_wolf", sklearn_lw)
    ref, why_ref = fit_gate(x, y, 3, k=8)
    assert ours is not None and why == why_ref
    for a, b in zip(
        (ours.means, ours.basis, ours.eigenvalues, ours.sigma2),
        (ref.means, ref.basis, ref.eigenvalues, ref.sigma2),
        strict=True,
    ):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-12 * np.abs(b).max()


def logits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An overconfident model's logits (T inside the bounds) and random ones (T at the upper bound)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(4, size=60)
    return rng.normal(0, 3, (60, 4)) + (8 * np.eye(4)[y] if seed == 0 else 0), y


Z0, Z1 = logits(0), logits(1)
FUNCTIONS = {
    "NLL, T inside": (lambda t: nll(*Z0, math.exp(t)), *np.log(T_BOUNDS)),
    "NLL, T at the upper bound": (lambda t: nll(*Z1, math.exp(t)), *np.log(T_BOUNDS)),
    "quadratic, minimum inside": (lambda x: (x - 0.3) ** 2 + 1, -2.0, 5.0),
    "quadratic, minimum past the upper bound": (lambda x: (x - 9.0) ** 2, -1.0, 2.0),
    "quadratic, minimum at the lower bound": (lambda x: (x + 1.0) ** 2, -1.0, 2.0),
    "flat": (lambda x: 4.0, 0.0, 1.0),
    "quartic, flat bottom": (lambda x: (x - 1.7) ** 4, 0.0, 3.0),
    "cosine, several minima": (lambda x: math.cos(3 * x), -4.0, 4.0),
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_minimize_bounded_is_scipys(name):
    f, lo, hi = FUNCTIONS[name]
    expected = minimize_scalar(f, bounds=(lo, hi), method="bounded").x
    assert minimize_bounded(f, lo, hi) == expected


def test_minimize_bounded_stops_after_maxiter_evaluations():
    calls = []
    f = FUNCTIONS["quartic, flat bottom"][0]
    expected = minimize_scalar(f, bounds=(0, 3), method="bounded", options={"maxiter": 4})
    x = minimize_bounded(lambda x: calls.append(x) or f(x), 0.0, 3.0, maxiter=4)
    assert (
        len(calls) == 4 and x == expected.x and minimize_scalar(f, bounds=(0, 3), method="bounded").nfev > 4
    )


CHILD = """
import json, sys
import numpy as np
from headstart.calibration import fit, fit_gate
rng = np.random.default_rng(0)
y = np.repeat(np.arange(3), 20)
gate, why = fit_gate(rng.normal(0, 1, (60, 16)) + 3 * np.eye(16)[y], y, 3, k=4)
rule, _ = fit(rng.normal(0, 2, (60, 3)), y, 0.1, "test")
loaded = [m for m in sys.modules if m.split(".")[0] == "sklearn" or m.startswith("scipy.optimize")]
print(json.dumps({"gate": gate is not None, "t": rule.temperature, "loaded": loaded}))
"""


def test_fitting_loads_neither_sklearn_nor_scipy_optimize():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got["gate"] and got["t"] > 0 and got["loaded"] == []


@pytest.mark.parametrize("shape,k", [((64, 1280), 32), ((15, 40), 10), ((40, 41), 39)])
def test_the_gates_eigenpairs_from_the_gram_matrix_are_the_covariances(shape, k):
    """Fewer rows than features: the top k eigenpairs of the Ledoit-Wolf covariance, and the mean of
    the rest, come from the n x n Gram matrix; they equal the p x p eigendecomposition's (eigenvectors
    up to sign), and so do the gate's scores; the shrinkage equals ledoit_wolf's."""
    from headstart.calibration import ledoit_wolf_shrinkage, top_eigen

    r = rows(shape, 8)
    r -= r.mean(0)
    values, vectors = np.linalg.eigh(ledoit_wolf(r)[0])
    top, basis, sigma2 = top_eigen(r, k)
    assert np.abs(top - values[::-1][:k]).max() <= 1e-9 * values.max()
    assert abs(sigma2 - values[: shape[1] - k].mean()) <= 1e-9 * values.max()
    assert np.abs(np.abs(basis.T @ vectors[:, ::-1][:, :k]) - np.eye(k)).max() <= 1e-6
    s, _ = ledoit_wolf_shrinkage(r, r @ r.T / shape[0])
    assert abs(s - ledoit_wolf(r)[1]) <= 1e-12 and 0 < s < 1


def test_the_gate_falls_back_to_the_full_eigendecomposition_when_residuals_span_too_little():
    """Residuals of rank 3 asked for k = 5 directions: the Gram route cannot give them; the full
    eigendecomposition does (the shrinkage's share fills the rest)."""
    from headstart.calibration import top_eigen

    r = rows((20, 3), 9) @ rows((3, 30), 10)
    top, basis, _ = top_eigen(r, 5)
    values = np.linalg.eigvalsh(ledoit_wolf(r)[0])[::-1]
    assert np.allclose(top, values[:5]) and basis.shape == (30, 5)
