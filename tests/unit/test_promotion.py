"""headstart.promotion: the paired bootstrap, McNemar, clean evidence, and the decision rule."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from headstart import HeadstartError
from headstart.config import PromoteParams
from headstart.promotion import (
    Predictions,
    becomes_best,
    clean_rows,
    compare,
    decide,
    gates,
    mcnemar,
    paired_bootstrap,
    seen,
    to_markdown,
    too_few,
    version_tags,
)

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


def test_markdown_shows_both_models_and_the_clean_evidence():
    y, new, old = _preds(50, 0.9, 0.8)
    labels = [("a", "b")[i] for i in y]
    p = PromoteParams(n_bootstrap=100)
    champion = compare(labels, Predictions("2", ["a", "b"], new), Predictions("1", ["a", "b"], old), p, 0)
    best = compare(
        labels, Predictions("2", ["a", "b"], new), Predictions("0", ["b", "a"], 1 - old), p, 0, "best"
    )
    decision = {
        "model_name": "m",
        "version": "2",
        "champion_version": "1",
        "best_version": "0",
        "promoted": True,
        "reason": "r",
        "gates": PASS,
        "clean": {"n_images": 50, "n_current": 80, "versions": ["2", "1", "0"]},
        "comparison": champion,
        "best_comparison": best,
    }
    md = to_markdown(decision)
    assert "| metric | v2 (new) | v1 (champion) |" in md and md.count("Confusion matrix") == 2
    assert "Against the champion v1" in md and "Against the best v0" in md and md.count("McNemar") == 2
    assert "Clean evidence: 50 of 80 current images were seen by none of v2, v1, v0" in md
    # the best's classes in another order are the same classes: identical predictions, same numbers
    assert best["difference"] == champion["difference"] and best["ci_low"] == champion["ci_low"]
    tags = version_tags(decision)
    assert tags["promotion.clean_images"] == "50" and tags["promotion.best_before"] == "0"
    assert float(tags["promotion.best.ci_low"]) == pytest.approx(best["ci_low"], abs=1e-4)


# --- scipy gives the answers the hand-written versions gave -------------------------------------------


def _old_bootstrap(y, pred_new, pred_old, n=2000, confidence=0.95, seed=0):
    """The numpy implementation promotion used before scipy, kept as the reference."""
    diff = (pred_new == y).astype(np.float64) - (pred_old == y).astype(np.float64)
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n, len(y)))
    alpha = (1 - confidence) / 2
    return np.quantile(diff[idx].mean(1), [alpha, 1 - alpha])


def _old_mcnemar_p(b: int, c: int) -> float:
    m = b + c
    return 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2**m)


@pytest.mark.parametrize(
    ("n", "acc_new", "acc_old", "seed"), [(7, 0.8, 0.7, 1), (301, 0.9, 0.8, 2), (1500, 0.7, 0.75, 3)]
)
def test_scipy_bootstrap_and_mcnemar_match_the_old_answers(n, acc_new, acc_old, seed):
    y, new, old = _preds(n, acc_new, acc_old, seed)
    r = paired_bootstrap(y, new, old, n=1000, confidence=0.9, seed=seed)
    low, high = _old_bootstrap(y, new, old, 1000, 0.9, seed)
    assert r["ci_low"] == pytest.approx(low, abs=1e-12) and r["ci_high"] == pytest.approx(high, abs=1e-12)
    mc = mcnemar(y, new, old)
    assert mc["p_value"] == pytest.approx(
        _old_mcnemar_p(mc["only_old_right"], mc["only_new_right"]), rel=1e-9
    )


def test_fixed_inputs_give_fixed_numbers():
    y = np.array([0, 1] * 20)
    new, old = y.copy(), y.copy()
    new[:3] = 1 - new[:3]  # 3 images only the old model gets right...
    old[10:11] = 1 - old[10:11]  # ...1 only the new one
    r = paired_bootstrap(y, new, old, n=500, seed=0)
    # the values main computed with its numpy implementation before the move to scipy
    assert (r["difference"], r["ci_low"], r["ci_high"]) == pytest.approx((-0.05, -0.15, 0.038125))
    assert mcnemar(y, new, old) == {"only_old_right": 3, "only_new_right": 1, "p_value": pytest.approx(0.625)}


def test_one_models_interval_is_the_paired_bootstrap_against_a_model_always_wrong():
    """headstart.metrics.accuracy_interval and paired_bootstrap share one resampler (same draws)."""
    from headstart.metrics import accuracy_interval

    y, new, _ = _preds(185, 0.8, 0.7, 4)
    wrong = (y + 1) % 2
    a = accuracy_interval(new == y, 700, 0.9, 4)
    r = paired_bootstrap(y, new, wrong, n=700, confidence=0.9, seed=4)
    assert (a["accuracy"], a["ci_low"], a["ci_high"]) == (r["difference"], r["ci_low"], r["ci_high"])


def test_bootstrap_memory_stays_bounded_at_10k_images():
    y, new, old = _preds(10_000, 0.9, 0.88)
    tracemalloc.start()
    try:
        paired_bootstrap(y, new, old, n=2000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 120e6, peak  # all 2000 x 10k resamples at once would take 320 MB


# --- drift: a chain of slightly worse versions --------------------------------------------------------


def _worse(y: np.ndarray, pred: np.ndarray, share: float) -> np.ndarray:
    """pred with `share` of all images, among those it gets right, turned wrong."""
    out = pred.copy()
    right = np.flatnonzero(out == y)
    out[right[: round(share * len(y))]] = 1 - y[right[: round(share * len(y))]]
    return out


def test_a_chain_of_versions_each_worse_stops_before_losing_more_than_the_margin():
    p = PromoteParams(n_bootstrap=500)  # margin 0.02
    y = np.random.default_rng(0).integers(0, 2, 10_000)
    labels = [("a", "b")[i] for i in y]
    versions = {"1": np.where(np.arange(len(y)) % 10 == 0, 1 - y, y)}  # 90% right
    for v in ("2", "3", "4"):
        versions[v] = _worse(y, versions[str(int(v) - 1)], 0.015)
    preds = {v: Predictions(v, ["a", "b"], pred) for v, pred in versions.items()}
    champion, best, history = "1", "1", []
    for v in ("2", "3", "4"):
        vs_champion = compare(labels, preds[v], preds[champion], p, 0)
        vs_best = compare(labels, preds[v], preds[best], p, 0, "best") if best != champion else None
        promoted, reason = decide(PASS, vs_champion, p.margin, best=vs_best)
        history.append((v, promoted, reason))
        if promoted:
            best = v if becomes_best(promoted, vs_champion, vs_best) else best
            champion = v
        assert not promoted or preds[v].pred.__eq__(y).mean() >= (versions["1"] == y).mean() - p.margin
    assert [h[1] for h in history] == [True, False, False], history
    assert history[0][2].startswith("not worse") and best == "1" and champion == "2"
    assert history[1][2].startswith("drift") and "best champion so far v1" in history[1][2]
    # each step alone is within the margin: without the best reference v3 would have been promoted
    assert decide(PASS, compare(labels, preds["3"], preds["2"], p, 0), p.margin)[0]


def test_becomes_best():
    better, worse = {"difference": 0.01}, {"difference": -0.01}
    assert becomes_best(True, None, None)  # the first champion
    assert becomes_best(True, better, None) and not becomes_best(True, worse, None)
    assert not becomes_best(True, better, worse) and becomes_best(True, worse, better)
    assert not becomes_best(False, better, better)


# --- clean evidence, gates -----------------------------------------------------------------------------


def test_clean_rows_exclude_what_any_version_trained_or_validated_on():
    rows = pd.DataFrame({"sha256": list("abcdef"), "label": ["x"] * 6, "split": ["test"] * 6})
    champion = seen(pd.DataFrame({"sha256": list("abcz"), "split": ["train", "val", "test", "train"]}))
    assert champion == frozenset("abz")
    clean = clean_rows(rows, [champion, frozenset("d")])
    assert list(clean["sha256"]) == ["c", "e", "f"]
    p = PromoteParams(min_clean_images=4)
    reason = too_few(len(clean), len(rows), ["2", "1"], p)
    assert reason.startswith("too few clean images: 3 of 6") and "v2, v1" in reason
    assert "promote.min_clean_images=4" in reason
    assert too_few(4, 6, ["2", "1"], p) == ""
    assert decide(PASS, None, 0.02, reason) == (False, reason)


def test_models_with_other_classes_are_not_compared():
    p = PromoteParams(n_bootstrap=100)
    with pytest.raises(HeadstartError, match=r"v1 predicts \['a', 'c'\], v2 predicts"):
        compare(
            ["a", "b"],
            Predictions("2", ["a", "b"], np.array([0, 1])),
            Predictions("1", ["a", "c"], np.array([0, 1])),
            p,
            0,
        )


def test_gates_from_tags_and_metrics():
    p = PromoteParams(min_accuracy=0.5, allowed_verdicts=["in_domain"])
    tags = {"validate.success": "true", "domain.verdict": "shifted", "export.parity_passed": "true"}
    tags |= {"evaluate.signal": "true", "evaluate.estimate": "held_out"}
    g = gates(tags, {"test_accuracy": 0.4, "estimate_accuracy": 0.6}, p)
    assert {n: x["passed"] for n, x in g.items()} == {
        "validation": True,
        "domain": False,
        "export_parity": True,
        "signal": True,
        "accuracy": True,  # the floor applies to the estimate evaluate chose, not the test figure
    }
    assert "held-out" in g["accuracy"]["detail"] and "0.6" in g["accuracy"]["detail"]
    assert not gates(tags, {"test_accuracy": 0.6, "estimate_accuracy": 0.4}, p)["accuracy"]["passed"]
    assert gates({}, {"test_accuracy": 0.6}, p)["accuracy"]["passed"]  # a version from before estimates
    none = gates({}, {}, p)
    assert not none["accuracy"]["passed"] and "not recorded" in none["validation"]["detail"]
    assert not none["signal"]["passed"] and "no signal test recorded" in none["signal"]["detail"]
    assert not gates({**tags, "evaluate.signal": "false"}, {"estimate_accuracy": 0.9}, p)["signal"]["passed"]


@pytest.mark.parametrize(
    "k,n,p",
    [
        (0, 10, 0.5),
        (8, 13, 0.5),
        (38, 67, 0.52),
        (67, 67, 0.5),
        (3, 120, 0.1),
        (700, 1200, 0.55),
        (5, 5, 0.0),
        (1, 5, 1.0),
        (11, 10, 0.5),
    ],
)
def test_the_binomial_tail_is_scipys_one_sided_binomtest(k, n, p):
    from scipy.stats import binomtest

    from headstart.promotion import binomial_tail

    want = binomtest(k, n, p, alternative="greater").pvalue if k <= n else 0.0
    assert binomial_tail(k, n, p) == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_the_estimate_is_the_test_split_from_enough_images_else_the_larger_held_out_one():
    from headstart.promotion import choose_estimate

    held = {"n": 67, "accuracy": 0.8}
    assert choose_estimate({"n": 13}, held, 100) == "held_out"
    assert choose_estimate({"n": 100}, {"n": 600, "accuracy": 0.8}, 100) == "test"
    assert choose_estimate({"n": 20}, {"n": 15, "accuracy": 0.8}, 100) == "test"  # the larger sample
    assert choose_estimate({"n": 13}, None, 100) == choose_estimate({"n": 13}, {"n": 0}, 100) == "test"


def test_learned_something_is_a_one_sided_test_against_the_largest_class():
    from headstart.promotion import learned_something

    random = {"name": "held-out", "accuracy": 38 / 67, "n": 67, "majority_rate": 34 / 67}
    s = learned_something(random, 0.95)
    assert (
        not s["passed"]
        and 0.1 < s["p_value"] < 0.5
        and "does not beat" in s["line"]
        and "38 of 67" in s["line"]
    )
    assert learned_something(random, 0.0)["passed"]  # 0: the gate is off
    good = random | {"accuracy": 50 / 67}
    assert learned_something(good, 0.95)["passed"] and "beats" in learned_something(good, 0.95)["line"]
    # 90% right where 90% is the largest class: nothing learned
    skewed = {"name": "test", "accuracy": 0.9, "n": 100, "majority_rate": 0.9}
    assert not learned_something(skewed, 0.95)["passed"]


def test_honest_estimate_reports_both_and_judges_the_chosen_one():
    from headstart.promotion import estimate_markdown, honest_estimate

    test = {"n": 13, "accuracy": 8 / 13, "accuracy_ci": [0.38, 0.85], "majority_rate": 7 / 13}
    calibrated = {
        "source": "out-of-fold logits",
        "held_out": {"n": 67, "accuracy": 38 / 67, "majority_rate": 0.5},
    }
    e, signal = honest_estimate(test, calibrated, 100, 0.95, (500, 0.95, 0))
    assert e["estimate"] == "held_out" and e["estimate_accuracy"] == pytest.approx(38 / 67)
    low, high = e["estimate_accuracy_ci"]
    assert low < 38 / 67 < high and high - low < 0.3  # 67 images: a narrower CI than 13 give
    assert e["estimates"]["test"]["n"] == 13 and e["estimates"]["held_out"]["source"] == "out-of-fold logits"
    assert not signal["passed"]
    text = estimate_markdown(e, signal)
    assert "NO SIGNAL" in text and "| held-out (calibrate's) |" in text and "**yes**" in text
    e2, s2 = honest_estimate(test, {"source": "x", "held_out": {}}, 100, 0.95, (500, 0.95, 0))
    assert e2["estimate"] == "test" and e2["estimates"]["held_out"] is None and not s2["passed"]


def test_the_domain_gate_judges_transfer_models_only():
    """A mismatch made the pipeline train from scratch; the backbone's verdict says nothing about that
    model, so it does not block its promotion (a transfer model on the same data stays blocked)."""
    p = PromoteParams(allowed_verdicts=["in_domain", "shifted"])
    tags = {"validate.success": "true", "domain.verdict": "mismatch", "export.parity_passed": "true"}
    assert not gates({**tags, "select.kind": "head"}, {"test_accuracy": 0.9}, p)["domain"]["passed"]
    scratch = gates({**tags, "select.kind": "scratch"}, {"test_accuracy": 0.9}, p)["domain"]
    assert scratch["passed"] and "trained from scratch" in scratch["detail"]
    # transfer chosen over a from-scratch model trained on the same data: the evidence answered it
    compared = gates({**tags, "select.kind": "head", "scratch.trained": "true"}, {}, p)["domain"]
    assert compared["passed"] and "selection chose head" in compared["detail"]
