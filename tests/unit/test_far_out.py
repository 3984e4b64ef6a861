"""evaluate's far-out images (noise, flat colours) through the feature cache: the same images every run,
so a warm run's rates come from cached features and the head alone, never building the backbone."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from headstart.backbones import load_backbone
from headstart.calibration import AbstentionRule, FeatureGate, far_out_images, far_out_rate
from headstart.models import far_out_abstention, made_features, pixel_logits
from headstart.preprocess import InputSpec
from headstart.scratch import ScratchModel, resnet
from headstart.training import TrainedModel, make_head
from tests.conftest import TINY_BACKBONE

CLASSES = ["a", "b", "c"]


def _gate(d: int) -> FeatureGate:
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(d, 4)))[0]
    return FeatureGate(np.abs(rng.normal(size=(3, d))), basis, np.array([0.4, 0.3, 0.2, 0.1]), 0.05)


def _rule(tau: float) -> AbstentionRule:
    ood = {"score": "mahalanobis_ppca_unit", "k": 4, "output": "ood_score", "threshold": tau, "alpha": 0.05}
    return AbstentionRule(1.0, 0.1, 0.5, None, 3, 50, ood=ood)


def test_a_warm_far_out_check_builds_no_backbone_and_gives_the_eager_paths_numbers(tiny_weights, tmp_path):
    base = load_backbone(TINY_BACKBONE, weights=tiny_weights[0], weights_sha256=tiny_weights[1])
    torch.manual_seed(0)
    head = make_head(base.num_features, len(CLASSES), 8, 0.0).eval()
    net, builds = base.model, []

    def lazy() -> TrainedModel:
        def build():
            builds.append(1)
            return net

        return TrainedModel(head, dataclasses.replace(base, _model=build), CLASSES)

    gate, made = _gate(base.num_features), far_out_images(base.spec.size, base.spec.channels)
    eager = {kind: pixel_logits(lazy(), x, with_features=True) for kind, x in made.items()}
    tau = float(np.median(np.concatenate([gate.score(f) for _, f in eager.values()])))
    rule = _rule(tau)  # half of the made images out: rates that a wrong feature would move
    expected = {kind: far_out_rate(rule, z, gate.score(f)) for kind, (z, f) in eager.items()}
    builds.clear()

    cold = far_out_abstention(lazy(), rule, tmp_path, gate)
    assert builds, "the first run computes the made images' features: it builds the backbone"
    assert cold == expected and 0 < sum(r["rate_out_of_distribution"] for r in cold.values()) < 2
    builds.clear()
    warm_model = lazy()
    assert far_out_abstention(warm_model, rule, tmp_path, gate) == cold
    for kind, x in made.items():  # the cached features and the head's logits: the eager path's bits
        f = made_features(warm_model, x, tmp_path)
        np.testing.assert_array_equal(f, eager[kind][1])
        np.testing.assert_array_equal(warm_model.head_logits(f), eager[kind][0])
    assert builds == [] and not warm_model.backbone.built


def test_a_missing_entry_recomputes_the_batch_and_another_backbone_has_its_own(tiny_weights, tmp_path):
    base = load_backbone(TINY_BACKBONE, weights=tiny_weights[0], weights_sha256=tiny_weights[1])
    model = TrainedModel(make_head(base.num_features, 2, 0, 0.0).eval(), base, ["a", "b"])
    x = far_out_images(base.spec.size, base.spec.channels, n=4)["noise"]
    first = made_features(model, x, tmp_path)
    entries = sorted((tmp_path / "features").rglob("*.npy"))
    assert len(entries) == 4 and all(".made-" in e.name for e in entries)
    entries[1].unlink()
    np.testing.assert_array_equal(made_features(model, x, tmp_path), first)
    assert len(list((tmp_path / "features").rglob("*.npy"))) == 4
    other = dataclasses.replace(base, weights_sha256="0" * 64)  # e.g. fine-tuned blocks: another digest
    made_features(TrainedModel(model.head, other, ["a", "b"]), x, tmp_path)
    assert len(list((tmp_path / "features").rglob("*.npy"))) == 8


def test_a_scratch_model_runs_its_own_module_and_caches_nothing(tmp_path):
    torch.manual_seed(0)
    model = ScratchModel(resnet(3, 3, 32, depth=8).eval(), InputSpec(32, (0.5,) * 3, (0.5,) * 3), CLASSES)
    d = model.module[-1].in_features
    out = far_out_abstention(model, _rule(1e9), tmp_path, _gate(d))
    assert out["noise"]["n"] == 16 and out["flat"]["abstention_rate"] is not None
    assert not (tmp_path / "features").exists()
