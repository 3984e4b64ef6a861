"""The parity gate's shortcuts: other batch sizes probed against the smallest (bitwise), and torch's
reference read from the feature cache; neither may pass what running everything would fail."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from headstart.calibration import FeatureGate
from headstart.config import ExportParams, Tolerances
from headstart.export import (
    agreement,
    export_onnx,
    export_variants,
    judge,
    parity,
    scored,
    to_markdown,
    torch_reference,
)
from headstart.features import FeatureCache, feature_key
from headstart.runtime import Predictor
from headstart.training import Classifier, TrainedModel
from tests.conftest import COLOURS, make_image, visible_head_model

CLASSES = ["red", "green", "blue"]
SIZES = (1, 5, 8)


@pytest.fixture(scope="module")
def model(tiny_weights) -> TrainedModel:
    return visible_head_model(tiny_weights, CLASSES)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    return [make_image(root / f"{i}.png", COLOURS[i % 3], seed=i, size=(30 + 7 * i, 40)) for i in range(12)]


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(model.module, path, model.spec, {"headstart.classes": json.dumps(CLASSES)}, 18)


def _every_image(path, reference, sizes) -> dict:
    """What the gate measured before the probe: every image at every batch size."""
    p = Predictor(path, providers=("CPUExecutionProvider",), warmup=False)
    y = np.array([i % 3 for i in range(len(reference.logits))])
    return {
        str(bs): agreement(
            reference.logits,
            np.concatenate([p.logits(reference.floats[i : i + bs]) for i in range(0, len(y), bs)]),
            y,
            0.0,
        )
        for bs in sizes
    }


def test_probed_batch_sizes_give_the_figures_of_running_every_image(model, images, onnx_path):
    reference = torch_reference(model.module, images, model.spec)
    labels = [i % 3 for i in range(len(images))]
    figures = parity(model.module, onnx_path, images, SIZES, labels, reference)
    checked = {bs: v.pop("checked") for bs, v in figures["batch_sizes"].items()}
    assert checked == {
        "1": "every image",
        "5": "bitwise equal to batch 1 on 7 probe images",
        "8": "bitwise equal to batch 1 on 12 probe images",
    }
    assert figures["batch_sizes"] == _every_image(onnx_path, reference, SIZES)


def _mixing_rows(path, out):
    """The exported graph with half the batch's mean logit added to each row: right only for batch 1
    (up to a factor), wrong in a way that depends on which images share a batch."""
    proto = onnx.load(path)
    producer = next(n for n in proto.graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "raw"
    proto.graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "mix_axis")])
    proto.graph.initializer.extend([numpy_helper.from_array(np.array(0.5, np.float32), "mix_half")])
    proto.graph.node.extend(
        [
            helper.make_node("ReduceMean", ["raw", "mix_axis"], ["mix_mean"], keepdims=1),
            helper.make_node("Mul", ["mix_mean", "mix_half"], ["mix_shift"]),
            helper.make_node("Add", ["raw", "mix_shift"], ["logits"]),
        ]
    )
    onnx.checker.check_model(proto)
    onnx.save(proto, out)
    return out


def test_a_graph_that_mixes_rows_runs_every_image_at_every_batch_size(model, images, onnx_path, tmp_path):
    broken = _mixing_rows(onnx_path, tmp_path / "mixing.onnx")
    reference = torch_reference(model.module, images, model.spec)
    figures = parity(model.module, broken, images, SIZES, [i % 3 for i in range(len(images))], reference)
    checked = {bs: v.pop("checked") for bs, v in figures["batch_sizes"].items()}
    assert checked == {
        "1": "every image",
        "5": "every image (batch 1 differs)",
        "8": "every image (batch 1 differs)",
    }
    assert figures["batch_sizes"] == _every_image(broken, reference, SIZES)
    assert judge(figures, Tolerances().fp32)  # and the gate refuses it, as before


def test_reference_from_cached_torch_features(model, images, tmp_path):
    """torch's pass over the frozen backbone read from the feature cache (runtime torch) gives the same
    reference as the whole model in torch: what a full export (a model not grafted) compares with."""
    shas = [f"sha{i}" for i in range(len(images))]
    features = model.features(images, shas, "torch", tmp_path, 32)
    whole, cached = (torch_reference(model.module, images, model.spec, f) for f in (None, features))
    assert np.abs(whole.logits - cached.logits).max() < 1e-5 and np.ptp(whole.logits) > 0.1
    assert np.array_equal(whole.floats, cached.floats)


def test_grafted_export_compares_with_the_graphs_own_features(model, images, tmp_path, monkeypatch):
    """A grafted file is the cached backbone graph + the head: its reference is that graph's features
    (the onnxruntime feature cache, what the head trained on) + the torch head, so export never runs
    the backbone in torch; the graph was held to torch once, when it was exported, and the parity
    figures say so. The reference still agrees with the whole model in torch."""
    shas = [f"sha{i}" for i in range(len(images))]
    p = ExportParams(fp16=False, parity_batch_sizes=[1, 4])
    meta = {"headstart.classes": json.dumps(CLASSES)}
    args = (model, tmp_path / "out", meta, images, [i % 3 for i in range(len(images))], p)
    first = export_variants(*args, cache_dir=tmp_path / "cache", shas=shas)
    stored = FeatureCache(tmp_path / "cache", feature_key(model.backbone, "onnxruntime"))
    assert all(s in stored for s in shas)
    assert "grafted" in first["fp32"]["build"]
    assert first["fp32"]["reference"].startswith("the cached backbone graph's features")
    assert "matched torch within" in first["fp32"]["reference"]
    assert "compared with the cached backbone graph" in to_markdown(first)
    whole = torch_reference(model.module, images, model.spec)
    ours = torch_reference(None, images, model.spec, np.stack([stored.get(s) for s in shas]), model.head)
    assert np.abs(whole.logits - ours.logits).max() < 1e-4 and np.ptp(whole.logits) > 0.1

    def no_torch(*_):
        raise AssertionError("the backbone ran in torch")

    monkeypatch.setattr("headstart.features.TorchEngine.__call__", no_torch)
    monkeypatch.setattr(Classifier, "forward", no_torch)
    again = export_variants(*args, cache_dir=tmp_path / "cache", shas=shas)
    assert (
        again["fp32"]["passed"] and again["fp32"]["max_abs_logit_diff"] == first["fp32"]["max_abs_logit_diff"]
    )
    assert first["fp32"]["max_abs_logit_diff"] < 1e-4


def test_reference_from_features_keeps_the_gate_score(model, images):
    """A Scored model's reference from features has the gate's score, as its full pass does."""
    rng = np.random.default_rng(0)
    d, k = model.backbone.num_features, 4
    means = rng.normal(size=(len(CLASSES), d))
    basis = np.linalg.qr(rng.normal(size=(d, k)))[0]
    gate = FeatureGate(
        means / np.linalg.norm(means, axis=1, keepdims=True), basis, np.linspace(0.5, 0.1, k), 0.01
    )
    module = scored(model.module, gate)
    whole = torch_reference(module, images, model.spec)
    with torch.inference_mode():
        features = model.module.features(torch.from_numpy(whole.floats)).numpy()
    cached = torch_reference(module, images, model.spec, features)
    assert cached.ood is not None and np.ptp(cached.ood) > 0
    assert np.allclose(whole.ood, cached.ood, rtol=1e-5) and np.abs(whole.logits - cached.logits).max() < 1e-5


def test_probe_plan_runs_one_batch_at_a_time_on_every_core(monkeypatch):
    """A probe's batches (the first and the last, partial one) run one after another, each on every
    worker's thread: one large batch's activations in memory at a time."""
    from headstart import export

    monkeypatch.setattr(export, "_workers", lambda: 2)
    assert export.probe_plan(12, (1, 5, 8, 12, 16)) == {
        5: ([0, 10], 2),
        8: ([0, 8], 2),
        12: ([0], 2),
        16: ([0], 2),
    }
    monkeypatch.setattr(export, "_workers", lambda: 1)
    assert export.probe_plan(12, (1, 12)) == {12: ([0], 1)}


def test_a_lone_probe_on_two_threads_gives_the_figures_of_running_every_image(
    model, images, onnx_path, tmp_path, monkeypatch
):
    """The batch-12 probe (one batch) runs on a 2-thread session, reopened from the 1-thread one; its
    outputs equal batch 1's bit for bit, and a graph that mixes rows still runs every image, on one
    thread per run again."""
    from headstart import export

    monkeypatch.setattr(export, "_workers", lambda: 2)
    threads = []
    outputs = Predictor.outputs

    def counted(self, batch):
        threads.append((len(batch), self.threads))
        return outputs(self, batch)

    monkeypatch.setattr(Predictor, "outputs", counted)
    reference = torch_reference(model.module, images, model.spec)
    labels = [i % 3 for i in range(len(images))]
    sizes = (1, 12)
    figures = parity(model.module, onnx_path, images, sizes, labels, reference)
    checked = {bs: v.pop("checked") for bs, v in figures["batch_sizes"].items()}
    assert checked == {"1": "every image", "12": "bitwise equal to batch 1 on 12 probe images"}
    assert sorted(set(threads)) == [(1, 1), (12, 2)]
    monkeypatch.setattr(Predictor, "outputs", outputs)
    assert figures["batch_sizes"] == _every_image(onnx_path, reference, sizes)

    broken = _mixing_rows(onnx_path, tmp_path / "mixing.onnx")
    threads.clear()
    monkeypatch.setattr(Predictor, "outputs", counted)
    figures = parity(model.module, broken, images, sizes, labels, reference)
    assert figures["batch_sizes"]["12"]["checked"] == "every image (batch 1 differs)"
    assert threads[-1] == (12, 1)  # the full run at batch 12: one thread per run again
