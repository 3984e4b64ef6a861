"""Export by grafting: the head composed with the cached backbone graph equals the full export."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
import torch

from headstart.calibration import FeatureGate
from headstart.config import ExportParams, Tolerances
from headstart.export import (
    export_onnx,
    export_variants,
    judge,
    parity,
    scored,
    to_markdown,
    torch_reference,
)
from headstart.features import backbone_onnx, digest_path
from headstart.graft import GraftRefused, check_graft, graft_source
from headstart.runtime import Predictor
from headstart.training import TrainedModel, make_head
from tests.conftest import COLOURS, make_image, visible_head_model

CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def model(tiny_weights) -> TrainedModel:
    return visible_head_model(tiny_weights, CLASSES)


@pytest.fixture(scope="module")
def gate(model) -> FeatureGate:
    rng = np.random.default_rng(0)
    d, k = model.backbone.num_features, 4
    means = rng.normal(size=(len(CLASSES), d))
    basis = np.linalg.qr(rng.normal(size=(d, k)))[0]
    return FeatureGate(
        means / np.linalg.norm(means, axis=1, keepdims=True), basis, np.linspace(0.5, 0.1, k), 0.01
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    sizes = [(40, 32), (200, 90), (33, 120), (160, 160), (17, 17), (64, 48), (90, 90)]
    return [make_image(root / f"{i}.png", COLOURS[i % 3], seed=i, size=s) for i, s in enumerate(sizes)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _outputs(path, reference):
    p = Predictor(path, providers=("CPUExecutionProvider",), warmup=False)
    return p.outputs(reference.pixels if p.input_kind == "uint8" else reference.floats)


@pytest.mark.parametrize(
    "kind, fp16, with_gate",
    [("float32", False, False), ("uint8", False, True), ("float32", True, True), ("uint8", True, False)],
)
def test_grafted_equals_full_export(model, gate, images, cache, tmp_path, kind, fp16, with_gate):
    """Same inputs, outputs, dynamic batch and metadata as the full export; the same logits (and
    ood_score) within the fp32 tolerance; each passes its parity gate against torch."""
    g = gate if with_gate else None
    source, build = graft_source(model, cache, 18, g)
    assert source is not None and build.startswith("grafted"), build
    meta = {"headstart.classes": json.dumps(CLASSES)}
    args = (model.module, model.spec, meta, 18, kind, fp16, g)
    full = export_onnx(args[0], tmp_path / "full.onnx", *args[1:])
    graft = export_onnx(args[0], tmp_path / "graft.onnx", *args[1:], graft=source)
    a, b = onnx.load(full), onnx.load(graft)
    domains = [o.domain for o in b.opset_import]
    assert len(domains) == len(set(domains))  # one import per domain: onnxruntime's quantizer needs it
    onnx.checker.check_model(b, full_check=True)
    for x, y in ((a.graph.input, b.graph.input), (a.graph.output, b.graph.output)):
        assert [v.name for v in x] == [v.name for v in y]
        for u, v in zip(x, y, strict=True):
            assert u.type.tensor_type.elem_type == v.type.tensor_type.elem_type
            du, dv = u.type.tensor_type.shape.dim, v.type.tensor_type.shape.dim
            assert [d.dim_value for d in du] == [d.dim_value for d in dv]
            assert dv[0].dim_param and not dv[0].HasField("dim_value")  # the symbolic batch
    assert {p.key: p.value for p in a.metadata_props} == {p.key: p.value for p in b.metadata_props}
    reference = torch_reference(scored(model.module, g), images, model.spec)
    ours, theirs = _outputs(graft, reference), _outputs(full, reference)
    tol = Tolerances().fp32.max_abs_diff
    assert np.abs(ours[0] - theirs[0]).max() <= (tol if not fp16 else 0.1 * Tolerances().fp16.max_abs_diff)
    assert np.abs(ours[0]).max() > 0.1  # logits that differ visibly: the comparison means something
    if with_gate:
        assert np.allclose(ours[1], theirs[1], rtol=1e-4, atol=0)
    figures = parity(scored(model.module, g), graft, images, (1, 3), reference=reference)
    assert judge(figures, Tolerances().fp16 if fp16 else Tolerances().fp32) == []


def test_head_of_another_width_is_refused(model, cache):
    graph = onnx.load(backbone_onnx(model.backbone, cache))
    wrong = make_head(model.backbone.num_features + 1, 2, 0, 0.0)
    with pytest.raises(GraftRefused, match=f"takes {model.backbone.num_features + 1} features"):
        check_graft(graph, model.backbone, wrong, None, 18)


def test_graph_of_other_weights_is_refused_and_the_full_export_runs(model, images, tmp_path, caplog):
    """A cached graph whose weights digest is not the model's (intact by its own sha256) is not
    grafted: the variants are exported whole, say so, and pass their gate."""
    import hashlib

    path = backbone_onnx(model.backbone, tmp_path)
    proto = onnx.load(path)
    props = {p.key: p.value for p in proto.metadata_props}
    props["headstart.backbone_weights_sha256"] = "0" * 64
    onnx.helper.set_model_props(proto, props)
    data = proto.SerializeToString()
    path.write_bytes(data)
    digest_path(path).write_text(hashlib.sha256(data).hexdigest())
    p = ExportParams(fp16=False, parity_batch_sizes=[1, 7])
    with caplog.at_level(logging.WARNING, "headstart.graft"):
        meta = {"headstart.classes": json.dumps(CLASSES)}
        figures = export_variants(
            model, tmp_path / "out", meta, images, [0] * len(images), p, None, cache_dir=tmp_path
        )
    assert "0000000000" in caplog.text and "full export" in caplog.text
    for f in figures.values():
        assert f["build"].startswith("full export: the cached backbone graph was exported from weights")
        assert f["passed"], f["failures"]
    assert "- model.onnx: full export: the cached backbone graph" in to_markdown(figures)


def test_fine_tuned_model_gets_the_full_export(model, cache):
    tuned = TrainedModel(model.head, model.backbone, CLASSES, finetuned=True)
    assert graft_source(tuned, cache, 18, None) == (
        None,
        "full export: a finetuned model, not a head on a frozen backbone",
    )


def test_corrupted_cached_graph_is_rebuilt(model, tmp_path, caplog):
    """A flipped byte inside a weight passes the ONNX checker; the sha256 beside the file catches it."""
    path = backbone_onnx(model.backbone, tmp_path)
    good = path.read_bytes()
    proto = onnx.load(path)
    init = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    at = good.index(init.raw_data) + len(init.raw_data) // 2
    path.write_bytes(good[:at] + bytes([good[at] ^ 0x55]) + good[at + 1 :])
    onnx.checker.check_model(str(path))  # still a valid model: only the hash knows
    with caplog.at_level(logging.WARNING, "headstart.features"):
        source, build = graft_source(model, tmp_path, 18, None)
    assert source == path and build.startswith("grafted") and path.read_bytes() == good
    assert "damaged" in caplog.text and path.name in caplog.text


def test_other_head_layers_and_opset_17(model, gate, images, tmp_path):
    """A head of layers without a hand-built form goes through the exporter on its own; opset 17
    (reductions with axes as attributes) grafts onto its own cached backbone graph."""
    torch.manual_seed(1)
    d = model.backbone.num_features
    head = torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.GELU(), torch.nn.Linear(8, 3)).eval()
    with torch.no_grad():
        head[0].weight.mul_(100.0)
    other = TrainedModel(head.eval(), model.backbone, CLASSES)
    source, build = graft_source(other, tmp_path, 17, gate)
    assert source is not None and build.startswith("grafted"), build
    meta = {"headstart.classes": json.dumps(CLASSES)}
    path = export_onnx(
        other.module, tmp_path / "m.onnx", other.spec, meta, 17, "float32", False, gate, source
    )
    reference = torch_reference(scored(other.module, gate), images, other.spec)
    figures = parity(scored(other.module, gate), path, images, (1, 4), reference=reference)
    assert judge(figures, Tolerances().fp32) == []
    ood = _outputs(path, reference)[1]
    assert np.allclose(ood, reference.ood, rtol=1e-4, atol=0) and np.ptp(ood) > 0


def test_a_warm_grafted_export_never_builds_the_backbone(model, gate, images, tmp_path):
    """Once torch's features of the parity images and the backbone graph are cached, the export
    (file by graft, reference from the cached features through the head) builds no torch backbone,
    and its figures are those of the run that did."""
    import dataclasses
    import hashlib

    builds = []

    def lazy() -> TrainedModel:
        def build():
            builds.append(1)
            return model.backbone.model

        return TrainedModel(model.head, dataclasses.replace(model.backbone, _model=build), CLASSES)

    shas = [hashlib.sha256(p.read_bytes()).hexdigest() for p in images]
    p = ExportParams(fp16=True, parity_batch_sizes=[1, 7])
    meta = {"headstart.classes": json.dumps(CLASSES)}
    labels = [i % 3 for i in range(len(images))]
    cold = export_variants(lazy(), tmp_path / "a", meta, images, labels, p, gate, (), tmp_path, shas)
    assert builds, "the first export computes torch's features: it builds the backbone"
    builds.clear()
    warm_model = lazy()
    warm = export_variants(warm_model, tmp_path / "b", meta, images, labels, p, gate, (), tmp_path, shas)
    assert builds == [] and not warm_model.backbone.built
    for name in ("fp32", "fp16"):
        assert warm[name]["build"].startswith("grafted onto the cached backbone graph")
        assert warm[name]["passed"], warm[name]["failures"]
        for k in ("max_abs_logit_diff", "top1_agreement", "ood_decision_flips", "batch_sizes"):
            np.testing.assert_equal(warm[name][k], cold[name][k])
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()


def test_builtin_specs_are_timms():
    """What a built-in backbone is known by before it is built must be what building it gives."""
    import timm

    from headstart.backbones import BUILTIN, BUILTIN_SPECS, _timm_spec

    for name, (arch, _, _) in BUILTIN.items():
        net = timm.create_model(arch, pretrained=False)
        assert BUILTIN_SPECS[name] == (_timm_spec(net), net.num_features), name
