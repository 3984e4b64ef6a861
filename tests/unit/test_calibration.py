"""headstart.calibration on synthetic logits, and the rule shipped in ONNX metadata as the runtime and
`headstart predict` apply it (a hand-built graph: channel means -> logits, no torch export)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from headstart import HeadstartError
from headstart.calibration import (
    AMBIGUOUS,
    METADATA_KEY,
    OUT_OF_DISTRIBUTION,
    AbstentionRule,
    apply,
    conformal_quantile,
    energy,
    far_out_images,
    fit,
    fit_temperature,
    kept_interval,
    run_metrics,
    selective_line,
    softmax,
)
from headstart.cli import main
from headstart.runtime import Predictor
from tests.unit.test_hostile_runtime import CLASSES, tiny_onnx


def draw(rng: np.random.Generator, n: int, k: int = 3, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a calibrated model (labels drawn from softmax(z)) with class-dependent means."""
    y0 = rng.integers(k, size=n)
    z = rng.normal(0, 1, (n, k)) + scale * np.eye(k)[y0]
    y = np.array([rng.choice(k, p=p) for p in softmax(z)])
    return z, y


def test_temperature_recovers_a_known_overconfidence():
    z, y = draw(np.random.default_rng(0), 4000)
    for t in (0.5, 2.5):  # the model's logits are the calibrated ones times t: T = t undoes it
        assert fit_temperature(z * t, y) == pytest.approx(t, rel=0.1)
    assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.1)


def test_a_perfectly_separated_held_out_set_cannot_make_a_wrong_answer_read_certain():
    """Held-out logits all right by a margin (a separable training set's out-of-fold logits): the
    plain NLL sharpens without bound (T at its lower bound); the rule of succession's 1/(n+2) keeps
    T finite, so a test image the model gets wrong by a small margin does not read 0.99+."""
    from headstart.calibration import T_BOUNDS, minimize_bounded, nll

    rng = np.random.default_rng(3)
    y = rng.integers(2, size=60)
    z = rng.normal(0, 0.3, (60, 2)) + np.where(np.eye(2)[y] > 0, rng.uniform(1.0, 4.0, (60, 1)), 0.0)
    assert (z.argmax(1) == y).all()
    lo, hi = np.log(T_BOUNDS)
    plain = math.exp(minimize_bounded(lambda t: nll(z, y, math.exp(t)), lo, hi))
    assert plain < 0.06  # what the plain NLL does on separable data: the bound, 0.05
    rule, report = fit(z, y, 0.1, "separable")
    assert 0.2 < rule.temperature < 1.5 and not report["temperature_at_bound"]
    wrong = np.array([[1.0, 0.0]])  # a test image of class 1 read as class 0 by a margin of 1
    assert softmax(wrong / rule.temperature).max() < 0.95
    assert softmax(wrong / plain).max() > 0.99999
    assert np.mean(softmax(z / rule.temperature).max(1)) > 0.9  # still confident where it is right


def test_conformal_sets_cover_one_minus_alpha_on_average_over_calibration_draws():
    rng, alpha, coverage = np.random.default_rng(1), 0.1, []
    for _ in range(300):
        z, y = draw(rng, 50)
        rule, _ = fit(z, y, alpha, "synthetic")
        zt, yt = draw(rng, 200)
        coverage.append(apply(rule, zt).sets[np.arange(200), yt].mean())
    # the guarantee: E[coverage] >= 1 - alpha (exactly ceil(51*0.9)/51 = 0.902 for continuous scores)
    assert np.mean(coverage) >= 1 - alpha - 0.005
    assert np.mean(coverage) <= 1 - alpha + 0.03  # and not trivially (all-class sets would give 1)
    assert 0.02 < np.std(coverage) < 0.08  # "a spread of a few points" at n = 50


def test_the_energy_gate_rejects_at_most_alpha_in_distribution_and_far_logits_all():
    rng, alpha, rejected = np.random.default_rng(2), 0.1, []
    for _ in range(200):
        z, y = draw(rng, 50)
        rule, _ = fit(z, y, alpha, "synthetic")
        rejected.append(np.mean([r == OUT_OF_DISTRIBUTION for r in apply(rule, draw(rng, 200)[0]).reasons]))
    assert np.mean(rejected) <= alpha + 0.01
    far = rng.normal(0, 0.1, (100, 3))  # small logits: the model recognises nothing (high energy)
    a = apply(rule, far)
    assert a.abstain.all() and set(a.reasons) == {OUT_OF_DISTRIBUTION}  # checked before ambiguity


def test_energy_is_minus_t_logsumexp():
    z = np.array([[1.0, 2.0, 3.0]])
    t = 2.0
    assert energy(z, t)[0] == pytest.approx(-t * np.log(np.exp(z / t).sum()))


def test_too_few_images_say_so_and_every_set_holds_every_class():
    z, y = draw(np.random.default_rng(3), 5)
    rule, report = fit(z, y, 0.1, "synthetic")
    assert conformal_quantile(np.arange(8.0), 0.1) is None and conformal_quantile(np.arange(9.0), 0.1) == 8
    assert rule.set_threshold == 1.0 and rule.energy_threshold is None
    assert "too few" in report["too_few"] and "need 9" in report["too_few"]
    a = apply(rule, z)
    assert a.sets.all() and set(a.reasons) == {AMBIGUOUS}


def test_the_report_has_the_figures():
    z, y = draw(np.random.default_rng(4), 500)
    rule, r = fit(z * 3, y, 0.1, "validation split")
    assert r["source"] == "validation split" and r["n"] == 500 and r["temperature"] == rule.temperature
    assert r["nll_after"] < r["nll_before"] and r["ece_after"] < r["ece_before"]
    held = r["held_out"]
    assert held["coverage"] >= 0.9 and set(held["abstention_by_reason"]) == {OUT_OF_DISTRIBUTION, AMBIGUOUS}
    assert held["selective_accuracy"] > held["accuracy"]
    ci = kept_interval(held, 2000, 0.95, 0)  # what calibrate and evaluate report
    low, high = ci["selective_accuracy_ci"]
    assert low < held["selective_accuracy"] < high and high - low < 0.2 and ci["ci_confidence"] == 0.95
    assert f"(95% CI {100 * low:.1f}-{100 * high:.1f}%; all: " in selective_line(ci)
    flat = run_metrics(None, ci)
    assert flat["test_abstention.selective_accuracy_ci_low"] == low
    assert flat["test_abstention.selective_accuracy_ci_high"] == high
    none_kept = kept_interval({**held, "kept": 0, "selective_accuracy": None}, 2000, 0.95, 0)
    assert none_kept["selective_accuracy_ci"] is None and "CI" not in selective_line(none_kept)


def test_the_rule_round_trips_through_json():
    rule, _ = fit(*draw(np.random.default_rng(5), 100), 0.1, "synthetic")
    assert AbstentionRule.from_json(rule.to_json()) == rule
    assert json.loads(rule.to_json())["format"] == "headstart.abstention/2"


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: "{not json",
        lambda d: "[1, 2]",
        lambda d: json.dumps({**d, "format": "headstart.abstention/9"}),
        lambda d: json.dumps({**d, "temperature": -1}),
        lambda d: json.dumps({**d, "temperature": "1"}),
        lambda d: json.dumps({**d, "set_threshold": 2}),
        lambda d: json.dumps({**d, "alpha": 0}),
        lambda d: json.dumps({**d, "energy_threshold": "high"}),
        lambda d: json.dumps({**d, "n_classes": True}),
        lambda d: json.dumps({**d, "extra": 1}),
        lambda d: json.dumps({k: v for k, v in d.items() if k != "temperature"}),
    ],
)
def test_a_damaged_rule_is_one_line_naming_the_model(tmp_path, damage):
    good = json.loads(_rule().to_json())
    bad = tiny_onnx(tmp_path / "bad.onnx", meta={METADATA_KEY: damage(good)})
    with pytest.raises(HeadstartError, match=METADATA_KEY.replace(".", r"\.")) as err:
        Predictor(bad, providers="cpu")
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_a_rule_for_other_classes_is_refused(tmp_path):
    bad = tiny_onnx(tmp_path / "bad.onnx", meta={METADATA_KEY: _rule(n_classes=2).to_json()})
    with pytest.raises(HeadstartError, match="for 2 classes"):
        Predictor(bad, providers="cpu")


def _rule(**kw) -> AbstentionRule:
    # the tiny graph: a saturated colour gives logits ~(7, -9, -9), grey ~(0, 0, 0) (energy ~ -1.1)
    d = dict(
        temperature=1.0, alpha=0.1, set_threshold=0.6, energy_threshold=-3.0, n_classes=3, n_calibration=50
    )
    return AbstentionRule(**{**d, **kw})


@pytest.fixture
def shipped(tmp_path):
    """A model with a rule in its metadata and three images: red (answered), grey (out of
    distribution), yellow (red and green tie: ambiguous)."""
    model = tiny_onnx(tmp_path / "m.onnx", meta={METADATA_KEY: _rule().to_json()})
    files = []
    for name, colour in (("red", (220, 10, 10)), ("grey", (128, 128, 128)), ("yellow", (220, 220, 10))):
        Image.new("RGB", (48, 40), colour).save(tmp_path / f"{name}.png")
        files.append(tmp_path / f"{name}.png")
    return model, files


def test_predictor_applies_the_shipped_rule(shipped):
    model, files = shipped
    p = Predictor(model, providers="cpu")
    red, grey, yellow = p.predict_files(files)
    assert (red.label, red.abstain, red.reason) == ("red", False, None)
    assert (grey.abstain, grey.reason) == (True, OUT_OF_DISTRIBUTION)
    assert (yellow.abstain, yellow.reason) == (True, AMBIGUOUS) and yellow.label in ("red", "green")
    raw = p.predict_files(files, abstain=False)
    assert [(r.abstain, r.reason) for r in raw] == [(None, None)] * 3
    assert [r.label for r in raw] == [r.label for r in (red, grey, yellow)]


def test_the_rule_calibrates_the_probabilities(tmp_path, shipped):
    _, files = shipped
    hot = tiny_onnx(tmp_path / "hot.onnx", meta={METADATA_KEY: _rule(temperature=4.0).to_json()})
    calibrated = Predictor(hot, providers="cpu").predict_files(files[:1])[0]
    raw = Predictor(hot, providers="cpu").predict_files(files[:1], abstain=False)[0]
    assert calibrated.label == raw.label and calibrated.confidence < raw.confidence


def test_a_model_without_a_rule_answers_as_before(tmp_path, shipped):
    _, files = shipped
    (r,) = Predictor(tiny_onnx(tmp_path / "plain.onnx"), providers="cpu").predict_files(files[1:2])
    assert r.abstain is False and r.reason is None and r.label in CLASSES


def test_predict_shows_abstentions_in_tsv_json_and_the_summary(shipped, capsys):
    model, files = shipped
    assert main(["predict", "--model", str(model), *map(str, files)]) == 0
    out = capsys.readouterr()
    lines = [line.split("\t") for line in out.out.splitlines()]
    assert [len(f) for f in lines] == [3, 4, 4]
    assert lines[1][3] == "abstain:out_of_distribution" and lines[2][3] == "abstain:ambiguous"
    assert "2 abstained: 1 ambiguous, 1 out_of_distribution" in out.err
    assert main(["predict", "--json", "--model", str(model), *map(str, files)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["abstain"], r["reason"]) for r in rows] == [
        (False, None),
        (True, OUT_OF_DISTRIBUTION),
        (True, AMBIGUOUS),
    ]


def test_no_abstain_gives_the_raw_argmax(shipped, capsys):
    model, files = shipped
    assert main(["predict", "--no-abstain", "--json", "--model", str(model), *map(str, files)]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert all(r["abstain"] is None and r["reason"] is None for r in rows) and "abstained" not in out.err
    assert rows[0]["label"] == "red"


def test_far_out_images_are_noise_and_flat_colours_at_the_input_size():
    made = far_out_images(24, 1, n=8)
    assert made["noise"].shape == made["flat"].shape == (8, 24, 24, 1)
    assert made["noise"].std() > 60 and all(len(np.unique(x)) == 1 for x in made["flat"])
    assert [int(x[0, 0, 0]) for x in made["flat"][:3]] == [0, 255, 128]
