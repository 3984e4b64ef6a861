"""headstart.domain: the BN-statistics divergence, its verdicts on real images, and its guards."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from headstart.domain import Probe, analyse, auroc, calibrate, calibration_sets, reference, run_probe, verdict
from headstart.preprocess import preprocess


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    from tests.conftest import tiny_backbone

    return tiny_backbone(tiny_weights)


@pytest.fixture(scope="module")
def lite0():
    from headstart.backbones import load_backbone

    return load_backbone("efficientnet_lite0")


def _score(backbone, images) -> dict:
    x = np.stack([preprocess(im.convert("RGB"), backbone.spec) for im in images])
    probe = Probe(backbone)
    return analyse(run_probe(probe, [x[i : i + 8] for i in range(0, len(x), 8)]), probe.layers)


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
    result = calibrate(Probe(lite0), lite0.spec, seed=3, per_set=6, n_sets=2)
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

    from headstart.backbones import Backbone, _timm_spec

    torch.manual_seed(0)
    vit = timm.create_model("test_vit").eval()  # LayerNorm only
    probe = Probe(Backbone("test_vit", vit, _timm_spec(vit), vit.num_features, "0"))
    x = np.random.default_rng(0).normal(size=(3, 3, 160, 160)).astype(np.float32)
    s = analyse(run_probe(probe, [x]), probe.layers)
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

    from headstart.backbones import Backbone, _timm_spec

    model = timm.create_model("test_efficientnet").eval()
    probe = Probe(Backbone("tiny", model, _timm_spec(model), model.num_features, "0"))
    s = analyse(run_probe(probe, []), probe.layers)
    assert s["n_images"] == 0 and s["bn_divergence"] is None


def test_the_probe_shares_its_pass_with_feature_extraction(tiny_weights, tmp_path):
    """The probe's first output is the extractor's features, bit for bit in torch; its onnxruntime
    graph gives the same signals as torch; its pass fills the feature cache, never overwriting."""
    from headstart.backbones import load_backbone
    from headstart.features import Features, TorchEngine, backbone_onnx
    from tests.conftest import TINY_BACKBONE, make_folder

    backbone = load_backbone(TINY_BACKBONE, *tiny_weights)
    probe = Probe(backbone)
    size = backbone.spec.size
    x = np.random.default_rng(1).normal(size=(5, 3, size, size)).astype(np.float32)
    features = TorchEngine(backbone.feature_extractor())(x)
    out = TorchEngine(probe.module)(x)
    assert np.array_equal(out[0], features) and len(out) == 2 + 2 * len(probe.layers)

    torch_signals = analyse(run_probe(probe, [x]), probe.layers)
    from headstart.features import OrtEngine

    ort = OrtEngine(backbone_onnx(backbone, tmp_path, probe=probe))
    ort_signals = analyse([(x, ort(x))], probe.layers)
    assert ort_signals["bn_divergence"] == pytest.approx(torch_signals["bn_divergence"], rel=1e-4)
    assert ort_signals["max_softmax"] == pytest.approx(torch_signals["max_softmax"], rel=1e-4)

    data = make_folder(tmp_path / "data", per_class=3, classes=("a", "b"))
    paths = sorted(data.rglob("*.png"))
    shas = [f"{i:064x}" for i in range(len(paths))]
    feats = Features(backbone, "torch", tmp_path / "cache", batch_size=4)
    feats.cache.put(shas[0], np.full(backbone.num_features, 7.0))  # already cached: left alone
    passes = list(feats.probe(probe, paths, shas))
    assert sum(len(xb) for xb, _ in passes) == len(paths) and feats.shared == len(paths) - 1
    got, computed = feats(paths, shas)
    assert computed == 0 and np.all(got[0] == 7.0)
    assert np.array_equal(got[1:], np.concatenate([o[0] for _, o in passes])[1:])


@pytest.mark.pretrained
def test_onnxruntime_probe_scores_like_torch_on_real_images(lite0, tmp_path):
    """The probe exported for onnxruntime (and run there in chunks of 2) gives torch's score on real
    elpv images to 3e-4. Before the probe centred each layer's output on its bias, the float32
    mean-square-minus-squared-mean moved the demo's score by 9e-4 between the two runtimes."""
    from headstart.features import make_engine

    x = np.stack([preprocess(im.convert("RGB"), lite0.spec) for im in _elpv(24, tmp_path)])
    probe = Probe(lite0)
    torch_signals = analyse(run_probe(probe, [x[:12], x[12:]]), probe.layers)
    engine = make_engine(lite0, "onnxruntime", tmp_path / "cache", probe=probe)
    assert engine.max_batch == 2
    ort_signals = analyse([(x, engine(x))], probe.layers)
    assert abs(ort_signals["bn_divergence"] - torch_signals["bn_divergence"]) < 3e-4
    assert ort_signals["max_softmax"] == pytest.approx(torch_signals["max_softmax"], abs=1e-4)


def _recording(backbone, builds: list):
    """The backbone, to be built on first use by a builder that records each call."""
    import dataclasses

    def build():
        builds.append(backbone.name)
        return backbone.model

    return dataclasses.replace(backbone, _model=build)


def _assert_same_layers(got: list[dict], expected: list[dict]) -> None:
    assert [r["layer"] for r in got] == [r["layer"] for r in expected] and expected
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys() and a["eps"] == b["eps"]
        for k in ("running_mean", "running_var", "weight"):
            assert a[k].dtype == b[k].dtype == np.float64 and np.array_equal(a[k], b[k])  # bit for bit


def test_a_warm_onnxruntime_probe_reads_its_layers_from_the_cached_graph(tiny, tmp_path):
    """The probe graph carries its BN layers: a second make_engine builds neither the backbone nor the
    instrumented module, and the layers it reads are exactly the module's."""
    from headstart.features import make_engine

    cold = Probe(tiny)
    make_engine(tiny, "onnxruntime", tmp_path, probe=cold)
    builds: list[str] = []
    lazy = _recording(tiny, builds)
    warm = Probe(lazy)
    engine = make_engine(lazy, "onnxruntime", tmp_path, probe=warm)
    assert builds == [] and not warm.built and not lazy.built
    _assert_same_layers(warm.layers, cold.module.layers)
    x = np.random.default_rng(0).normal(size=(2, 3, 160, 160)).astype(np.float32)
    assert len(engine(x)) == 2 + 2 * len(warm.layers)
    assert not warm.built  # running it needs no module either


@pytest.mark.parametrize("damage", ["truncated", "without_layers", "digest_gone"])
def test_a_damaged_or_layerless_probe_graph_is_exported_again(tiny, tmp_path, damage, caplog):
    """The layers are covered by the graph's sha256; a graph that lacks them (an older export under the
    same key) or fails its digest is exported again with them, never a crash."""
    import hashlib
    import logging

    import onnx

    from headstart.features import LAYERS_KEY, backbone_onnx, digest_path, make_engine

    path = backbone_onnx(tiny, tmp_path, probe=Probe(tiny))
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "digest_gone":
        digest_path(path).unlink()
    else:
        proto = onnx.load_from_string(good)
        kept = [p for p in proto.metadata_props if p.key != LAYERS_KEY]
        del proto.metadata_props[:]
        proto.metadata_props.extend(kept)
        data = proto.SerializeToString()
        path.write_bytes(data)
        digest_path(path).write_text(hashlib.sha256(data).hexdigest())
    probe = Probe(tiny)
    with caplog.at_level(logging.WARNING, "headstart.features"):
        make_engine(tiny, "onnxruntime", tmp_path, probe=probe)
    assert path.name in caplog.text or damage == "digest_gone"
    _assert_same_layers(probe.layers, Probe(tiny).module.layers)
    builds: list[str] = []
    again = Probe(_recording(tiny, builds))
    make_engine(again.backbone, "onnxruntime", tmp_path, probe=again)  # repaired: warm again
    assert builds == [] and not again.built
    _assert_same_layers(again.layers, probe.layers)
