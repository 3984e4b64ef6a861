"""The domain stage's warm run: the probe graph cached, it builds no torch backbone and finds what the
cold run found."""

from __future__ import annotations

import dataclasses
import json

from tasks import _backbone
from tasks.domain import domain
from tasks.prepare import prepare
from tasks.validate import validate


def test_a_warm_domain_stage_builds_no_backbone_and_gives_the_cold_verdict(tiny_params, monkeypatch):
    cfg = tiny_params
    assert cfg.train_head.runtime == "auto"  # onnxruntime on the CPU: the cached probe graph
    prepare(cfg)
    validate(cfg)
    real, builds = _backbone.load, []

    def lazy(cfg):
        backbone = real(cfg)

        def build():
            builds.append(backbone.name)
            return backbone.model

        return dataclasses.replace(backbone, _model=build)

    monkeypatch.setattr(_backbone, "load", lazy)
    report = cfg.stage_dir("domain") / "report.json"
    cold = domain(cfg)
    first = json.loads(report.read_text())
    assert builds and cold.n_images > 0  # the cold run exports the probe graph from the module
    builds.clear()
    warm = domain(cfg)
    again = json.loads(report.read_text())
    assert builds == []
    assert (warm.verdict, warm.score, warm.n_images) == (cold.verdict, cold.score, cold.n_images)
    assert first.pop("features_shared") == cold.n_images and again.pop("features_shared") == 0
    assert again == first  # every signal, the per-layer profile, the furthest images: the same
