"""headstart.domain: the BN-statistics divergence, its verdicts on real images, and its guards."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from headstart.domain import analyse, auroc, calibrate, calibration_sets, reference, verdict
from headstart.preprocess import preprocess


@pytest.fixture(scope="module")
def lite0():
    from headstart.backbones import load_backbone

    return load_backbone("efficientnet_lite0")


def _score(backbone, images) -> dict:
    x = np.stack([preprocess(im.convert("RGB"), backbone.spec) for im in images])
    return analyse(backbone.model, [x[i : i + 8] for i in range(0, len(x), 8)])


def _elpv(n: int, tmp_path) -> list[Image.Image]:
    from headstart.data.builtin import pull

    pull("elpv", tmp_path / "elpv", per_class=n // 2)
    return [Image.open(p) for p in sorted((tmp_path / "elpv").rglob("*.png"))]


@pytest.mark.pretrained
def test_photos_in_domain_elpv_between_digits_mismatch(lite0, tmp_path):
    sets = calibration_sets(seed=7, per_set=12, n_sets=1)
    ref = reference("efficientnet_lite0")
    photos, digits = _score(lite0, sets["photos"][0]), _score(lite0, sets["digits"][0])
    elpv = _score(lite0, _elpv(12, tmp_path))
    assert photos["bn_divergence"] < elpv["bn_divergence"] < digits["bn_divergence"]
    assert verdict(photos, ref)[0] == "in_domain"
    assert verdict(digits, ref)[0] == "mismatch"
    assert verdict(elpv, ref)[0] in ("shifted", "mismatch")
    assert photos["max_softmax"] > digits["max_softmax"]  # the pretrained head is surer on photos


@pytest.mark.pretrained
def test_calibration_separates_in_from_out_of_domain(lite0):
    result = calibrate(lite0.model, lite0.spec, seed=3, per_set=6, n_sets=2)
    assert result["auroc"] >= 0.95
    t = result["thresholds"]
    assert (
        max(result["table"]["photos"]) < t["shifted_at"] < t["mismatch_at"] < min(result["table"]["digits"])
    )


@pytest.mark.pretrained
@pytest.mark.parametrize("kind", ["one_image", "all_black", "constant_colour"])
def test_degenerate_inputs_give_finite_reports(lite0, kind):
    images = {
        "one_image": [Image.new("RGB", (50, 40), (120, 60, 30))],
        "all_black": [Image.new("RGB", (64, 64))] * 4,
        "constant_colour": [Image.new("RGB", (64, 64), (200, 200, 200))] * 4,
    }[kind]
    s = _score(lite0, images)
    json.dumps(s, allow_nan=False)  # raises on NaN or inf
    assert s["n_images"] == len(images) and s["bn_divergence"] > 0
    assert verdict(s, reference("efficientnet_lite0"))[0] == "mismatch"


def test_a_backbone_without_batchnorm_falls_back_to_the_head(tiny_weights):
    import timm
    import torch

    torch.manual_seed(0)
    vit = timm.create_model("test_vit").eval()  # LayerNorm only
    x = np.random.default_rng(0).normal(size=(3, 3, 160, 160)).astype(np.float32)
    s = analyse(vit, [x])
    assert s["bn_layers"] == 0 and s["bn_divergence"] is None and s["profile"] == []
    found, score = verdict(s, reference("test_vit"))
    assert found in ("in_domain", "shifted", "mismatch") and score == pytest.approx(s["max_softmax"])


def test_verdict_thresholds_and_auroc():
    ref = {"thresholds": {"shifted_at": 0.5, "mismatch_at": 1.0}}
    assert [verdict({"bn_divergence": v}, ref)[0] for v in (0.1, 0.7, 1.5)] == list(
        ("in_domain", "shifted", "mismatch")
    )
    assert auroc([0.1, 0.2], [0.9, 1.0]) == 1.0 and auroc([0.5], [0.5]) == 0.5
    assert reference("some/unknown_model")["borrowed_from"] == "efficientnet_lite0"


def test_empty_input_is_not_a_crash():
    import timm

    s = analyse(timm.create_model("test_efficientnet").eval(), [])
    assert s["n_images"] == 0 and s["bn_divergence"] is None
