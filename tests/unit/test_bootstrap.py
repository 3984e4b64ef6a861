"""headstart.metrics.percentile_bootstrap gives scipy.stats.bootstrap's numbers bit for bit without
loading scipy.stats: the flow keeps every module a stage imports until export, its peak."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import bootstrap

from headstart import metrics
from headstart.metrics import accuracy_interval, percentile_bootstrap
from headstart.promotion import paired_bootstrap

ROOT = Path(__file__).parents[2]


def _mean(a, axis):
    return a.mean(axis)


def _difference(a, b, axis):
    return (a - b).mean(axis)


def _scipy(samples, statistic, n, confidence, seed):
    """The call percentile_bootstrap made before it stopped importing scipy.stats."""
    ci = bootstrap(
        samples,
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=n,
        batch=max(1, metrics._BOOTSTRAP_CELLS // len(samples[0])),
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return float(ci.low), float(ci.high)


def _hits(size, accuracy, seed):
    return (np.random.default_rng(seed).random(size) < accuracy).astype(np.float64)


CASES = [  # (size, n resamples, confidence, seed)
    (2, 100, 0.95, 0),
    (3, 333, 0.9, 1),
    (50, 2000, 0.95, 2),
    (50, 701, 0.99, 3),
    (1000, 2500, 0.95, 4),  # batch 1000: two full batches and a half one
    (1000, 999, 0.5, 5),
    (137, 400, 1.0, 6),  # the extremes of the bootstrap distribution
]


@pytest.mark.parametrize(("size", "n", "confidence", "seed"), CASES)
def test_one_sample_mean_equals_scipy(size, n, confidence, seed):
    hit = _hits(size, 0.8, seed)
    assert percentile_bootstrap((hit,), _mean, n, confidence, seed) == _scipy(
        (hit,), _mean, n, confidence, seed
    )


@pytest.mark.parametrize(("size", "n", "confidence", "seed"), CASES)
def test_paired_difference_equals_scipy(size, n, confidence, seed):
    new, old = _hits(size, 0.8, seed), _hits(size, 0.7, seed + 100)
    ours = percentile_bootstrap((new, old), _difference, n, confidence, seed)
    assert ours == _scipy((new, old), _difference, n, confidence, seed)


@pytest.mark.parametrize(("cells", "size", "n"), [(7, 3, 101), (1, 50, 37), (1, 2, 5), (120, 50, 99)])
def test_small_batches_equal_scipy(monkeypatch, cells, size, n):
    """Batches of 2, 1, 1 and 2 resamples: the draws go batch by batch in both."""
    monkeypatch.setattr(metrics, "_BOOTSTRAP_CELLS", cells)
    new, old = _hits(size, 0.6, size), _hits(size, 0.5, n)
    assert percentile_bootstrap((new,), _mean, n, 0.95, 7) == _scipy((new,), _mean, n, 0.95, 7)
    assert percentile_bootstrap((new, old), _difference, n, 0.9, 8) == _scipy(
        (new, old), _difference, n, 0.9, 8
    )


@pytest.mark.parametrize("value", [0.0, 1.0, 0.3, 0.1])
def test_a_constant_sample_gives_what_scipy_gives(value):
    """No spread: every resample's statistic is the same number; scipy interpolates between equal values
    and warns of nothing (its degenerate warning is for a NaN interval), and so must this."""
    x = np.full(40, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for confidence in (0.95, 0.9, 0.8):
            ours = percentile_bootstrap((x,), _mean, 300, confidence, 0)
            assert ours == _scipy((x,), _mean, 300, confidence, 0) and ours[0] == ours[1] == x.mean()
        same = percentile_bootstrap((x, x), _difference, 300, 0.95, 0)
        assert same == _scipy((x, x), _difference, 300, 0.95, 0) == (0.0, 0.0)


def test_nan_gives_nan_and_a_warning_as_in_scipy():
    x = np.array([1.0, 0.0, np.nan, 1.0, 1.0])
    with pytest.warns(RuntimeWarning):
        theirs = _scipy((x,), _mean, 200, 0.95, 0)
    with pytest.warns(RuntimeWarning, match="NaN"):
        ours = percentile_bootstrap((x,), _mean, 200, 0.95, 0)
    assert all(map(math.isnan, theirs + ours))


def test_accuracy_interval_and_paired_bootstrap_equal_scipy():
    """The statistics headstart passes, through its own callers: a bool vector's mean, a paired difference."""
    y = np.random.default_rng(9).integers(0, 3, 185)
    new, old = (
        np.where(_hits(185, 0.8, 1) > 0, y, (y + 1) % 3),
        np.where(_hits(185, 0.7, 2) > 0, y, (y + 2) % 3),
    )
    a = accuracy_interval(new == y, 2000, 0.95, 0)
    assert (a["ci_low"], a["ci_high"]) == _scipy(((new == y).astype(np.float64),), _mean, 2000, 0.95, 0)
    r = paired_bootstrap(y, new, old, n=2000, confidence=0.95, seed=0)
    right = ((new == y).astype(np.float64), (old == y).astype(np.float64))
    assert (r["ci_low"], r["ci_high"]) == _scipy(right, _difference, 2000, 0.95, 0)


def test_the_interval_does_not_load_scipy_stats():
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from headstart.metrics import accuracy_interval, interval_fields\n"
        "a = accuracy_interval(np.arange(60) % 4 > 0, 500, 0.95, 0)\n"
        "interval_fields('accuracy', np.arange(60) % 3 > 0, 500, 0.95, 0)\n"
        "assert a['ci_low'] < a['accuracy'] < a['ci_high'], a\n"
        "print(sorted(m for m in sys.modules if m.startswith('scipy.stats')))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_the_quantiles_are_scipys_to_the_bit():
    """np.quantile's interpolation rounds differently (a third of these vectors): scipy's arithmetic it is."""
    from scipy.stats import quantile

    rng = np.random.default_rng(0)
    p = np.array([0.0, 0.005, 0.025, 0.05, 0.25, 0.5, 0.75, 0.95, 0.975, 0.995, 1.0, -0.1, 1.5, np.nan])
    for size in (*range(2, 40), 199, 1000, 2000, 2001):
        x = np.round(rng.random(size) * 50) / 50 if size % 2 else rng.normal(size=size)
        np.testing.assert_array_equal(metrics._linear_quantiles(x, p), quantile(x, p, axis=-1), strict=True)
    x[3] = np.nan
    assert np.isnan(metrics._linear_quantiles(x, p[:3])).all()
