"""The abstention benchmark's own pieces on tiny synthetic data, without training anything: the
synthetic images are what they claim, the figures and criteria are computed right, and a model's
answers and logits come through the runtime's decide step."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from benchmarks.abstention import (
    DEFAULT_ALPHA,
    SIZES,
    aurocs,
    best_score,
    criteria,
    figures,
    measure,
    ood_scores,
    rule,
    score_files,
    synthetic,
)
from headstart import HeadstartError
from headstart.calibration import AbstentionRule
from headstart.runtime import Prediction, Predictor
from tests.unit.test_hostile_runtime import tiny_onnx


def decoded(blobs: list[bytes]) -> list[np.ndarray]:
    out = []
    for b in blobs:
        img = Image.open(io.BytesIO(b))
        assert img.format == "PNG" and img.mode == "RGB"
        out.append(np.asarray(img))
    return out


def test_noise_images_are_valid_pngs_of_every_size_and_really_noise():
    for kind in ("uniform_noise", "gaussian_noise"):
        images = decoded(synthetic(kind, 8))
        assert {(a.shape[1], a.shape[0]) for a in images} == set(SIZES)
        big = images[2].astype(float)  # 224x224
        assert big.std() > 40 and len(np.unique(big)) > 200  # no flat patch posing as noise
    uniform, gauss = (np.concatenate([a.ravel() for a in decoded(synthetic(k, 4))]) for k in SYNTHETIC_NOISE)
    assert uniform.min() == 0 and uniform.max() == 255 and abs(uniform.mean() - 127.5) < 2
    # Gaussian: bell-shaped around mid-grey, so far more values near 128 than a uniform draw has
    assert abs(gauss.mean() - 128) < 2 and np.mean(abs(gauss - 128) < 32) > 1.5 * np.mean(
        abs(uniform - 128) < 32
    )
    assert synthetic("uniform_noise", 3, seed=1) == synthetic("uniform_noise", 3, seed=1)
    assert synthetic("uniform_noise", 3, seed=1) != synthetic("uniform_noise", 3, seed=2)


SYNTHETIC_NOISE = ("uniform_noise", "gaussian_noise")


def test_flat_images_are_one_colour_each_black_white_grey_then_random():
    images = decoded(synthetic("flat", 40))
    colours = []
    for a in images:
        assert (a == a[0, 0]).all()  # one colour, every pixel
        colours.append(tuple(int(v) for v in a[0, 0]))
    fixed = len(SIZES) * 3
    assert colours[:fixed] == [(0, 0, 0)] * 4 + [(255, 255, 255)] * 4 + [(128, 128, 128)] * 4
    assert len(set(colours[fixed:])) > 20  # random colours after the fixed ones


def test_synthetic_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind 'stripes'"):
        synthetic("stripes", 1)


def test_figures_from_predictions():
    preds = [
        Prediction("a", label="cat", abstain=False),  # kept, right
        Prediction("b", label="dog", abstain=False),  # kept, wrong
        Prediction("c", label="cat", abstain=False),  # kept, right
        Prediction("d", label="dog", abstain=True, reason="ambiguous"),  # declined (truth cat)
        Prediction("e", label="cat", abstain=True, reason="out_of_distribution"),
        Prediction("f", error="OSError: truncated"),  # not counted in the shares
    ]
    f = figures(preds, ["cat", "cat", "cat", "cat", "dog", "cat"])
    assert f["images"] == 6 and f["unreadable"] == 1
    assert f["kept"] == 0.6 and f["abstained"] == 0.4
    assert f["by_reason"] == {"ambiguous": 0.2, "out_of_distribution": 0.2}
    assert f["accuracy_kept"] == round(2 / 3, 4)  # 2 of the 3 kept
    assert f["accuracy_all"] == 0.4  # argmax right on a, c (e's argmax cat vs truth dog)
    assert f["coverage"] == 0.8  # every image but the confident mistake b
    unlabelled = figures(preds[:3])
    assert (
        "accuracy_kept" not in unlabelled and unlabelled["abstained"] == 0.0 and unlabelled["by_reason"] == {}
    )
    # no rule yet (abstain False everywhere) and nothing kept: shares stay defined, accuracy is None
    assert figures([Prediction("x", label="a", abstain=True, reason=None)], ["a"])["accuracy_kept"] is None


def test_criteria_hold_or_fail_against_the_rules_alpha():
    groups = {
        "own_test": {"kept": 0.86},
        "lfw": {"abstained": 0.51},
        "uniform_noise": {"abstained": 1.0},
        "gaussian_noise": {"abstained": 0.99},
        "flat": {"abstained": 0.985},
    }
    c = criteria(groups, alpha=0.1)
    assert c["own_test_kept"] == {"value": 0.86, "at_least": 0.85, "holds": True}
    assert c["lfw_abstained"]["holds"] and c["gaussian_noise_abstained"]["holds"]
    assert not c["flat_abstained"]["holds"] and not c["all_hold"]
    assert not criteria({**groups, "flat": {"abstained": 1.0}}, alpha=0.05)["own_test_kept"]["holds"]  # 0.9
    assert criteria({**groups, "flat": {"abstained": 1.0}}, alpha=0.1)["all_hold"]
    assert not criteria({**groups, "lfw": {"abstained": 0.5}}, alpha=0.1)["lfw_abstained"]["holds"]  # "most"


def test_scores_rank_confident_logits_above_flat_ones():
    own = np.array([[8.0, 0.0], [0.0, 9.0], [7.0, -1.0]])
    other = np.array([[0.1, 0.0], [0.0, 0.2]])
    s = ood_scores(own)
    assert np.allclose(
        np.exp(s["msp"]), [np.exp(8) / (np.exp(8) + 1), np.exp(9) / (np.exp(9) + 1), 1 / (1 + np.exp(-8))]
    )
    assert np.allclose(s["energy"], np.log(np.exp(own).sum(1))) and np.allclose(s["max_logit"], [8, 9, 7])
    assert aurocs(own, other) == {"msp": 1.0, "max_logit": 1.0, "energy": 1.0}
    assert aurocs(other, own)["energy"] == 0.0  # the order matters: own images are the positives
    # large logits: max softmax saturates at 1.0 in float64, its log still ranks them
    assert aurocs(np.array([[60.0, 0.0]]), np.array([[40.0, 0.0]]))["msp"] == 1.0
    assert best_score(
        {
            "a": {"msp": 0.9, "max_logit": 0.7, "energy": 0.95},
            "b": {"msp": 0.8, "max_logit": 0.99, "energy": 0.6},
        }
    ) == {
        "worst_auroc": {"msp": 0.8, "max_logit": 0.7, "energy": 0.6},
        "best": "msp",
    }


def test_a_model_is_measured_through_its_decide_step(tmp_path):
    """The hand-built 3-class model (channel means -> logits): own images, a foreign folder and the
    synthetic kinds are scored; the answers are decide's and the alpha is the rule's."""
    from benchmarks.abstention import Settings

    # saturated colours answer (energy ~ -7), grey-ish noise is out of distribution (energy ~ -1)
    meta = AbstentionRule(1.0, 0.2, 0.5, -3.0, n_classes=3, n_calibration=50).to_json()
    model = tiny_onnx(tmp_path / "m.onnx", meta={"headstart.abstention": meta})
    predictor = Predictor(model)
    paths, labels = [], []
    for i, (name, colour) in enumerate([("red", (220, 20, 20)), ("green", (20, 220, 20))] * 3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((20, 30, 3), colour, np.uint8)).save(paths[-1])
        labels.append(name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    own = score_files(predictor, [*paths, tmp_path / "broken.png"], [*labels, "red"])
    assert own.logits.shape == (6, 3) and own.predictions[-1].error
    assert [p.label for p in own.predictions[:6]] == labels
    assert all(p.abstain is False for p in own.predictions[:6])  # decide's answer
    out = measure(predictor, own, {"elsewhere": paths[:2]}, Settings(per_kind=4))
    assert out["rule"] == {"present": True, "alpha": 0.2, "metadata": json.loads(meta)}
    assert out["criteria"]["own_test_kept"]["at_least"] == 0.75
    assert out["groups"]["own_test"]["accuracy_kept"] == 1.0 and out["groups"]["own_test"]["unreadable"] == 1
    assert set(out["groups"]) == {"own_test", "elsewhere", "uniform_noise", "gaussian_noise", "flat"}
    assert all(out["groups"][k]["images"] == 4 for k in ("uniform_noise", "gaussian_noise", "flat"))
    assert set(out["auroc"]) == set(out["groups"]) - {"own_test"}
    g = out["groups"]
    assert g["uniform_noise"]["by_reason"] == {"out_of_distribution": 1.0} and g["flat"]["abstained"] == 1.0
    assert g["elsewhere"]["abstained"] == 0.0  # "elsewhere" is the own red/green images: kept
    assert not out["criteria"]["all_hold"] and not out["criteria"]["elsewhere_abstained"]["holds"]


def test_a_model_without_a_rule_reads_the_default_alpha(tmp_path):
    predictor = Predictor(tiny_onnx(tmp_path / "m.onnx"))
    assert rule(predictor) is None and DEFAULT_ALPHA == 0.1
    with pytest.raises(HeadstartError, match="headstart.abstention"):  # a damaged rule is refused
        Predictor(tiny_onnx(tmp_path / "b.onnx", meta={"headstart.abstention": "{not json"}))


def test_the_shipped_gate_score_is_ranked_beside_the_logit_scores():
    """Graph scores (higher = farther) become a `gate` AUROC; without them the column is absent."""
    from benchmarks.abstention import aurocs, best_score

    own, other = np.zeros((4, 2)), np.zeros((4, 2))
    with_gate = aurocs(own, other, 1.0, np.array([0.1, 0.2, 0.3, 0.4]), np.array([5.0, 6.0, 7.0, 8.0]))
    assert with_gate["gate"] == 1.0 and with_gate["energy"] == 0.5
    assert "gate" not in aurocs(own, other)
    assert best_score({"noise": with_gate})["best"] == "gate"
