"""The feature gate (maha_ppca_unit on the pooled features): fitted in numpy, computed in the exported
graph as the second output `ood_score` for each model kind, applied by Predictor and the Triton client."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from headstart import HeadstartError
from headstart.backbones import load_backbone
from headstart.calibration import (
    AMBIGUOUS,
    METADATA_KEY,
    OUT_OF_DISTRIBUTION,
    AbstentionRule,
    apply,
    far_out_images,
    fit,
    fit_gate,
    gate_file_bytes,
    read_gate,
)
from headstart.export import export_onnx, parity, torch_reference
from headstart.preprocess import InputSpec
from headstart.runtime import Predictor
from headstart.scratch import resnet
from headstart.training import Classifier, make_head
from tests.conftest import COLOURS, TINY_BACKBONE, make_image

CLASSES = ["red", "green", "blue"]


def features(
    rng: np.random.Generator, n: int, d: int = 48, classes: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Positive features (as after a ReLU and pooling): a class pattern plus low-rank variation."""
    y = rng.integers(classes, size=n)
    centres = np.abs(np.random.default_rng(99).normal(1, 0.5, (classes, d)))
    mix = np.random.default_rng(98).normal(0, 0.3, (4, d))
    x = centres[y] + rng.normal(0, 1, (n, 4)) @ mix + rng.normal(0, 0.05, (n, d))
    return np.abs(x), y


def test_the_fitted_gate_separates_far_features_from_its_own():
    rng = np.random.default_rng(0)
    x, y = features(rng, 200)
    gate, why = fit_gate(x, y, 3)
    assert gate is not None and gate.k == 32 and "200 images" in why
    own = gate.score(features(rng, 100)[0])
    far = gate.score(np.abs(rng.normal(0, 1, (100, 48))))  # other directions, other sizes
    assert own.max() < far.min()
    assert gate.score(x * 7)[:10] == pytest.approx(gate.score(x)[:10])  # direction only, not the norm
    assert np.isfinite(gate.score(np.zeros((2, 48)))).all()  # all-zero features: finite, not NaN


def test_the_library_gate_is_the_studys_maha_ppca_unit():
    from benchmarks.ood_scores import ppca, unit

    rng = np.random.default_rng(1)
    x, y = features(rng, 150)
    z = np.abs(rng.normal(1, 1, (20, 48)))
    gate, _ = fit_gate(x, y, 3, 16)
    assert gate.score(z) == pytest.approx(ppca(unit(x), y, 3, 16)(unit(z)), rel=1e-9)


@pytest.mark.parametrize(
    ("n", "d", "classes", "why"),
    [(5, 1, 2, "width >= 2"), (3, 8, 3, "more images than classes"), (6, 8, 3, "every class")],
)
def test_an_impossible_fit_says_why_and_the_rule_falls_back_to_energy(n, d, classes, why):
    x = np.abs(np.random.default_rng(2).normal(size=(n, d)))
    y = np.arange(n) % classes if why != "every class" else np.zeros(n, int)
    gate, reason = fit_gate(x, y, classes)
    assert gate is None and why in reason
    rule, report = fit(np.random.default_rng(3).normal(size=(40, 2)), np.arange(40) % 2, 0.1, "s", None, 0.05)
    assert rule.ood is None and rule.energy_threshold is not None and report["gate"] == "energy"


def test_the_gate_file_round_trips(tmp_path):
    gate, _ = fit_gate(*features(np.random.default_rng(4), 80), 3)
    (tmp_path / "g.npz").write_bytes(gate_file_bytes(gate, "fitted"))
    back = read_gate(tmp_path / "g.npz")
    z = features(np.random.default_rng(5), 10)[0]
    assert back.score(z) == pytest.approx(gate.score(z)) and back.k == gate.k
    (tmp_path / "none.npz").write_bytes(gate_file_bytes(None, "too few"))
    assert read_gate(tmp_path / "none.npz") is None


def test_the_threshold_rejects_at_most_ood_alpha_of_own_images():
    rng, rejected = np.random.default_rng(6), []
    x, y = features(rng, 200)
    gate, _ = fit_gate(x, y, 3)
    for _ in range(100):
        held, yh = features(rng, 60)
        rule, _ = fit(np.eye(3)[yh] * 3, yh, 0.1, "s", gate.score(held), 0.05, gate.k)
        new = features(rng, 200)[0]
        rejected.append((gate.score(new) > rule.ood["threshold"]).mean())
    assert rule.ood["alpha"] == 0.05 and rule.energy_threshold is None
    assert np.mean(rejected) <= 0.05 + 0.01


def test_the_argmax_is_always_in_the_set_and_ambiguous_means_more_than_one_class():
    rule = AbstentionRule(1.0, 0.1, 0.0, None, 3, 50)  # a threshold that would leave every set empty
    a = apply(rule, np.array([[3.0, 0.0, 0.0], [0.0, 0.1, 0.0]]))
    assert a.sets.sum(1).tolist() == [1, 1] and a.sets[[0, 1], [0, 1]].all() and not a.abstain.any()
    b = apply(AbstentionRule(1.0, 0.1, 0.9, None, 3, 50), np.array([[1.0, 1.0, -5.0]]))
    assert b.sets.sum() == 2 and b.reasons == [AMBIGUOUS]


def _gated_rule(tau: float, **kw) -> AbstentionRule:
    ood = {"score": "mahalanobis_ppca_unit", "k": 4, "output": "ood_score", "threshold": tau, "alpha": 0.05}
    return AbstentionRule(1.0, 0.1, 0.5, None, 3, 50, ood=ood | kw)


def test_the_old_format_loads_and_the_new_one_is_checked():
    old = {"temperature": 1.0, "alpha": 0.1, "set_threshold": 0.5, "energy_threshold": -3.0}
    old |= {"n_classes": 3, "n_calibration": 50, "format": "headstart.abstention/1"}
    rule = AbstentionRule.from_json(json.dumps(old))
    assert rule.ood is None and rule.energy_threshold == -3.0
    new = _gated_rule(2.0)
    assert AbstentionRule.from_json(new.to_json()) == new
    for bad in ({**json.loads(new.to_json()), "format": "headstart.abstention/1"}, _gated_rule(2.0, k=0)):
        text = json.dumps(bad) if isinstance(bad, dict) else bad.to_json()
        with pytest.raises(HeadstartError, match="not a valid abstention rule"):
            AbstentionRule.from_json(text)
    with pytest.raises(HeadstartError, match="'ood_score' output"):
        apply(new, np.zeros((1, 3)))  # the gate cannot be skipped silently


# --- the gate in real exported graphs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate_imgs")
    return [make_image(root / f"{i}.png", COLOURS[i % 3], seed=i, size=(40 + i, 36)) for i in range(12)]


def _transfer(tiny_weights):
    backbone = load_backbone(TINY_BACKBONE, weights=tiny_weights[0], weights_sha256=tiny_weights[1])
    torch.manual_seed(0)
    return Classifier(
        backbone.feature_extractor(), make_head(backbone.num_features, 3, 16, 0.2).eval()
    ).eval(), (backbone.spec)


def _scratch(spec):
    torch.manual_seed(0)
    return resnet(3, 3, 32, depth=8).eval(), InputSpec(32, spec.mean, spec.std)


def _fitted(module, split, spec, images):
    """The gate fitted on the module's own pooled features of `images` (labels by colour)."""
    ref = torch_reference(module, images, spec)
    with torch.no_grad():
        f = split(module)(torch.from_numpy(ref.floats)).numpy()
    gate, why = fit_gate(f, np.arange(len(images)) % 3, 3, 4)
    assert gate is not None, why
    return gate, f


@pytest.mark.parametrize("kind", ["head", "scratch"])
def test_the_graphs_ood_score_is_the_numpy_score_and_predictor_gates_on_it(
    kind, tiny_weights, images, tmp_path
):
    from headstart.export import feature_parts

    module, spec = _transfer(tiny_weights)
    if kind == "scratch":
        module, spec = _scratch(spec)
    gate, f = _fitted(module, lambda m: feature_parts(m)[0], spec, images)
    tau = float(np.quantile(gate.score(f), 0.9))
    meta = {"headstart.classes": json.dumps(CLASSES), METADATA_KEY: _gated_rule(tau, k=gate.k).to_json()}
    path = export_onnx(module, tmp_path / "m.onnx", spec, meta, 18, gate=gate)
    assert [o.name for o in onnx.load(path).graph.output] == ["logits", "ood_score"]
    p = Predictor(path, providers="cpu")
    ref = torch_reference(module, images, spec)
    logits, score = p.outputs(ref.floats)
    assert score.shape == (len(images),) and score.dtype == np.float32
    assert score == pytest.approx(gate.score(f), rel=1e-4, abs=1e-4 * abs(tau))
    assert logits == pytest.approx(ref.logits, abs=1e-4)
    answers = p.predict_files(images)
    assert [a.reason == OUT_OF_DISTRIBUTION for a in answers] == (gate.score(f) > tau).tolist()
    # a hand-set threshold below every own image: every image, noise and flat alike, is out
    made = far_out_images(spec.size, 3, n=4)
    low = export_onnx(
        module,
        tmp_path / "low.onnx",
        spec,
        {**meta, METADATA_KEY: _gated_rule(float(gate.score(f).min()) - 1, k=gate.k).to_json()},
        18,
        input_kind="uint8",
        gate=gate,
    )
    q = Predictor(low, providers="cpu")
    for pixels in made.values():
        logits, score = q.outputs(pixels)
        assert all(d["reason"] == OUT_OF_DISTRIBUTION for d in q.decide(logits, ood_score=score))
    figures = parity(_scored(module, gate), path, images, (1, 5))
    assert figures["ood_decision_flips"] == 0.0 and figures["ood_max_abs_diff_over_tau"] < 1e-3


def _scored(module, gate):
    from headstart.export import scored

    return scored(module, gate)


def test_fp16_keeps_the_score_in_fp32(tiny_weights, images, tmp_path):
    module, spec = _transfer(tiny_weights)
    from headstart.export import feature_parts

    gate, f = _fitted(module, lambda m: feature_parts(m)[0], spec, images)
    tau = float(np.median(gate.score(f)))
    meta = {"headstart.classes": json.dumps(CLASSES), METADATA_KEY: _gated_rule(tau, k=gate.k).to_json()}
    path = export_onnx(module, tmp_path / "h.onnx", spec, meta, 18, fp16=True, gate=gate)
    figures = parity(_scored(module, gate), path, images, (4,))
    assert figures["ood_decision_flips"] == 0.0 and figures["ood_max_abs_diff_over_tau"] < 0.05


def test_a_rule_that_gates_on_a_missing_output_is_refused_at_load(tmp_path):
    from tests.unit.test_hostile_runtime import tiny_onnx

    path = tiny_onnx(tmp_path / "m.onnx", meta={METADATA_KEY: _gated_rule(1.0).to_json()})
    with pytest.raises(HeadstartError, match="'ood_score', which the graph does not have") as err:
        Predictor(path, providers="cpu")
    assert "\n" not in str(err.value)


def test_triton_lists_the_score_and_its_client_answers_as_predictor(tiny_weights, images, tmp_path):
    from pathlib import Path

    from headstart.export import feature_parts
    from headstart.triton import check_config, config_json, config_text
    from tests.unit.test_triton import FakeHttp, client_module

    module, spec = _transfer(tiny_weights)
    gate, f = _fitted(module, lambda m: feature_parts(m)[0], spec, images)
    rule = _gated_rule(float(np.median(gate.score(f))), k=gate.k)
    meta = {"headstart.classes": json.dumps(CLASSES), METADATA_KEY: rule.to_json()}
    folder = tmp_path / "repo" / "gated"
    path = export_onnx(module, folder / "1" / "model.onnx", spec, meta, 18, input_kind="uint8", gate=gate)
    model = onnx.load(path)
    text = config_text("gated", model, 4, False, {p.key: p.value for p in model.metadata_props})
    assert check_config(text, model, "gated").startswith("checked against Triton's ModelConfig schema")
    outputs = config_json(text)["output"]
    assert [(o["name"], o["dims"], o.get("reshape", {})) for o in outputs] == [
        ("logits", ["3"], {}),
        ("ood_score", ["1"], {}),  # reshape to [] (a scalar per image): json_format drops the empty shape
    ]
    assert "reshape: { shape: [] }" in text
    (folder / "config.pbtxt").write_text(text)
    (folder / "client.py").write_text(
        (Path(__file__).parents[2] / "headstart" / "triton_client.py").read_text()
    )
    answers = client_module(folder).classify([str(p) for p in images], "gated", http=FakeHttp(folder.parent))
    expected = Predictor(path, providers="cpu").predict_files(images)
    assert [(a["label"], a["abstain"], a["reason"]) for a in answers] == [
        (e.label, e.abstain, e.reason) for e in expected
    ]
    assert 0 < sum(e.reason == OUT_OF_DISTRIBUTION for e in expected) < len(images)


def test_a_gate_fitted_for_another_model_is_one_line_not_a_broadcast_error():
    """A stale calibrate output (e.g. a stage run by hand after select chose another model) names the fix."""
    from headstart import HeadstartError
    from headstart.calibration import fit_gate

    rng = np.random.default_rng(0)
    gate, _ = fit_gate(rng.normal(size=(60, 16)), np.repeat([0, 1], 30), 2)
    with pytest.raises(HeadstartError, match="fitted on 16 features .* run the calibrate stage again"):
        gate.score(rng.normal(size=(3, 64)))
