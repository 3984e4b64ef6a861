"""The calibrate stage on tiny images: the cross-fit path (head-only model, a small validation split)
and the validation path; the rule reaches evaluate's figures, every exported variant's metadata and
`headstart predict`."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from headstart.calibration import METADATA_KEY, REASONS, AbstentionRule, far_out_images, read_gate
from headstart.config import load_params
from headstart.runtime import EXPORT_FILES, Predictor
from headstart.stages import NAMES, get
from tasks.calibrate import calibrate
from tests.conftest import make_folder, tiny_overrides


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_weights):
    """The stages up to select, once; each test calibrates (and goes on) in its own copy."""
    root = tmp_path_factory.mktemp("calibrate")
    data = make_folder(root / "data", per_class=14, classes=("cat", "dog", "owl"))
    overrides = tiny_overrides(root, data, tiny_weights)
    cfg = load_params(None, overrides)
    for name in NAMES[: NAMES.index("calibrate")]:
        get(name).function(cfg)
    return cfg, overrides


def _copy(run, tmp_path, *extra):
    cfg, base = run
    shutil.copytree(cfg.project.artifacts_dir, tmp_path / "artifacts")
    return load_params(None, [*base, f"project.artifacts_dir={tmp_path / 'artifacts'}", *extra])


def _report(cfg) -> dict:
    return json.loads((cfg.stage_dir("calibrate") / "abstention.json").read_text())


def test_a_small_validation_split_is_cross_fitted_over_train_and_val(run, tmp_path):
    cfg = _copy(run, tmp_path, "serve.folds=3")
    result = calibrate(cfg)
    d = _report(cfg)
    metrics = json.loads((cfg.stage_dir("train_head") / "metrics.json").read_text())
    n = metrics["n_train"] + metrics["n_val"]
    assert "cross-fitted over train+val" in result.source and "3 heads" in d["report"]["source"]
    assert d["report"]["n"] == n == result.n and d["rule"]["n_calibration"] == n
    rule = AbstentionRule(**d["rule"])  # the file holds a valid rule
    assert rule.alpha == cfg.serve.alpha and rule.temperature == d["report"]["temperature"]
    # 29+ images: a finite quantile at ood_alpha 0.05, so the feature gate, not the energy fallback
    assert rule.energy_threshold is None and rule.ood["alpha"] == cfg.serve.ood_alpha == 0.05
    assert (
        rule.ood["output"] == "ood_score"
        and 1 <= rule.ood["k"] <= 32
        and "out-of-fold" in d["report"]["gate_fit"]
    )
    assert read_gate(cfg.stage_dir("calibrate") / "ood_gate.npz").k == rule.ood["k"]
    held = d["report"]["held_out"]
    assert held["n"] == n and held["coverage"] >= 0.8 and set(held["abstention_by_reason"]) == set(REASONS)
    low, high = held["selective_accuracy_ci"]  # the kept images' accuracy, with promotion's bootstrap
    assert low <= held["selective_accuracy"] <= high and held["ci_confidence"] == cfg.promote.confidence
    summary = (cfg.stage_dir("calibrate") / "summary.md").read_text()
    assert "cross-fitted" in summary and "Temperature" in summary


def test_the_validation_split_when_it_is_large_enough_and_the_rule_ships(run, tmp_path, capsys):
    from headstart.cli import main

    cfg = _copy(run, tmp_path, "serve.min_calibration=0")
    assert calibrate(cfg).source.startswith("validation split (head model)")
    d = _report(cfg)
    assert d["report"]["too_few"] is not None  # ~6 validation images: too few at alpha 0.1, and said
    assert d["rule"]["set_threshold"] == 1.0 and d["rule"]["energy_threshold"] is None
    assert d["rule"]["ood"] is None and read_gate(cfg.stage_dir("calibrate") / "ood_gate.npz") is None
    ev = get("evaluate").function(cfg)
    test = json.loads((cfg.stage_dir("evaluate") / "metrics.json").read_text())["abstention"]
    assert test["n"] == ev.n_test and test["coverage"] == 1.0  # every set holds every class...
    assert test["abstention_by_reason"]["ambiguous"] == 1.0 and test["kept"] == 0  # ...so all abstain
    assert {k: (f["n"], f["abstention_rate"]) for k, f in test["far_out"].items()} == {
        "noise": (16, 1.0),
        "flat": (16, 1.0),
    }
    assert "Abstention (test split)" in (cfg.stage_dir("evaluate") / "summary.md").read_text()
    get("export").function(cfg)
    registered = json.loads((cfg.stage_dir("export") / "parity.json").read_text())["registered"]
    assert set(registered) == {"fp32", "fp16"}  # int8 is off by default
    files = [cfg.stage_dir("export") / EXPORT_FILES[v] for v in registered]
    for f in files:  # fp32 and fp16 carry the same rule
        meta = {p.key: p.value for p in onnx.load(f).metadata_props}
        assert AbstentionRule.from_json(meta[METADATA_KEY]) == AbstentionRule(**d["rule"])
    image = next((cfg.prepare.data_dir / "cat").iterdir())
    (r,) = Predictor(files[0], providers="cpu").predict_files([image])
    assert (r.abstain, r.reason) == (True, "ambiguous")
    assert main(["predict", "--model", str(files[0]), str(image)]) == 0
    assert capsys.readouterr().out.rstrip("\n").endswith("\tabstain:ambiguous")

    assert [o.name for o in onnx.load(files[0]).graph.output] == ["logits"]  # no gate: one output


def test_the_cross_fitted_gate_ships_in_the_graph_and_rejects_noise_and_flat_images(run, tmp_path):
    from PIL import Image

    cfg = _copy(run, tmp_path, "serve.folds=3")
    calibrate(cfg)
    rule = AbstentionRule(**_report(cfg)["rule"])
    get("evaluate").function(cfg)
    test = json.loads((cfg.stage_dir("evaluate") / "metrics.json").read_text())["abstention"]
    get("export").function(cfg)
    parity = json.loads((cfg.stage_dir("export") / "parity.json").read_text())["variants"]
    assert {n: f["ood_decision_flips"] for n, f in parity.items()} == {"fp32": 0.0, "fp16": 0.0}
    path = cfg.stage_dir("export") / EXPORT_FILES["fp32"]
    assert [o.name for o in onnx.load(path).graph.output] == ["logits", "ood_score"]
    p = Predictor(path, providers="cpu")
    made = far_out_images(p.spec.size, 3, n=8, seed=1)
    files = []
    for kind, pixels in made.items():
        for i, a in enumerate(pixels):
            files.append(tmp_path / f"{kind}{i}.png")
            Image.fromarray(a).save(files[-1])
    answers = p.predict_files(files)
    assert all(a.reason == "out_of_distribution" for a in answers)
    # the tiny data are noisy flat colours themselves: a random flat colour near a class's may pass
    assert (
        test["far_out"]["noise"]["abstention_rate"] == 1.0
        and test["far_out"]["flat"]["abstention_rate"] >= 0.9
    )
    assert test["abstention_by_reason"]["out_of_distribution"] <= 0.5 and rule.ood is not None
