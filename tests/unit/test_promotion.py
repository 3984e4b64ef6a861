"""headstart.promotion: the paired bootstrap, McNemar, and the decision rule."""

from __future__ import annotations

import numpy as np
import pytest

from headstart.promotion import decide, mcnemar, paired_bootstrap, to_markdown

PASS = {"validation": {"passed": True, "detail": "ok"}, "domain": {"passed": True, "detail": "ok"}}


def _preds(n: int, acc_new: float, acc_old: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    new = np.where(rng.random(n) < acc_new, y, 1 - y)
    old = np.where(rng.random(n) < acc_old, y, 1 - y)
    return y, new, old


def test_identical_models_give_a_zero_interval():
    y, new, _ = _preds(200, 0.8, 0.8)
    r = paired_bootstrap(y, new, new, n=500)
    assert r["difference"] == r["ci_low"] == r["ci_high"] == 0.0
    assert mcnemar(y, new, new)["p_value"] == 1.0


def test_a_clearly_better_model_has_a_positive_interval():
    y, new, old = _preds(400, 0.95, 0.7)
    r = paired_bootstrap(y, new, old, n=1000)
    assert r["ci_low"] > 0.1 and r["accuracy_new"] > r["accuracy_old"]
    assert mcnemar(y, new, old)["p_value"] < 1e-6
    assert decide(PASS, r, margin=0.02)[0]


def test_a_worse_model_is_rejected_and_small_noise_is_within_margin():
    y, new, old = _preds(400, 0.6, 0.9)
    assert not decide(PASS, paired_bootstrap(y, new, old, n=1000), margin=0.02)[0]
    y = np.zeros(300, int)
    old = y.copy()
    new = y.copy()
    new[:2] = 1  # two more mistakes in 300: indistinguishable, inside a 2% margin
    ok, reason = decide(PASS, paired_bootstrap(y, new, old, n=1000), margin=0.02)
    assert ok and "not worse" in reason
    ok, reason = decide(PASS, paired_bootstrap(y, new, old, n=1000), margin=0.0)
    assert not ok and "could be worse" in reason


def test_mcnemar_exact_value():
    # b=0, c=6: two-sided exact p = 2 * 0.5**6
    y = np.zeros(10, int)
    old = np.ones(10, int)
    old[6:] = 0
    new = np.zeros(10, int)
    assert mcnemar(y, new, old) == {
        "only_old_right": 0,
        "only_new_right": 6,
        "p_value": pytest.approx(2 / 64),
    }


def test_gates_and_first_model():
    assert decide(PASS, None, 0.02) == (True, "no champion yet: the first model that passes every gate")
    failed = {**PASS, "export_parity": {"passed": False, "detail": "export.parity_passed=false"}}
    ok, reason = decide(failed, None, 0.02)
    assert not ok and "export_parity" in reason
    assert decide(PASS, None, 0.02, note="cannot compare: classes differ") == (
        False,
        "cannot compare: classes differ",
    )


def test_markdown_shows_both_models():
    y, new, old = _preds(50, 0.9, 0.8)
    from headstart.metrics import classification_metrics

    decision = {
        "model_name": "m",
        "version": "2",
        "champion_version": "1",
        "promoted": True,
        "reason": "r",
        "gates": PASS,
        "comparison": paired_bootstrap(y, new, old, n=100),
        "mcnemar": mcnemar(y, new, old),
        "models": {
            "v2 (new)": {**classification_metrics(y, new, ["a", "b"]), "classes": ["a", "b"]},
            "v1 (champion)": {**classification_metrics(y, old, ["a", "b"]), "classes": ["a", "b"]},
        },
    }
    md = to_markdown(decision)
    assert (
        "| metric | v2 (new) | v1 (champion) |" in md
        and "McNemar" in md
        and md.count("Confusion matrix") == 2
    )
