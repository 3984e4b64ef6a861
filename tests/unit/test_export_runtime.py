"""headstart.export and headstart.runtime: ONNX with a dynamic batch, metadata, parity with torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from headstart import HeadstartError
from headstart.backbones import load_backbone
from headstart.export import export_onnx, parity
from headstart.runtime import Predictor, softmax
from headstart.training import Classifier, make_head
from tests.conftest import COLOURS, TINY_BACKBONE, make_image

CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def exported(tiny_weights, tmp_path_factory):
    """One export for the whole module: (classifier, spec, onnx path)."""
    backbone = load_backbone(TINY_BACKBONE, weights=tiny_weights[0], weights_sha256=tiny_weights[1])
    torch.manual_seed(0)
    head = make_head(backbone.num_features, len(CLASSES), 16, 0.2)
    # the random backbone's features are tiny: scale the head up so the logits differ visibly
    with torch.no_grad():
        head[0].weight.mul_(100.0)
    classifier = Classifier(backbone.feature_extractor(), head.eval()).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    out = export_onnx(classifier, path, backbone.spec, {"headstart.classes": json.dumps(CLASSES)}, opset=18)
    assert out == path
    return classifier, backbone.spec, path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    sizes = [(40, 32), (200, 90), (33, 120), (160, 160), (17, 17)]
    return [make_image(root / f"{i}.png", COLOURS[i % 3], seed=i, size=s) for i, s in enumerate(sizes)]


def test_onnx_has_dynamic_batch_and_metadata(exported):
    _, spec, path = exported
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert len(dims) == 4
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # symbolic batch
    assert [d.dim_value for d in dims[1:]] == [3, spec.size, spec.size]
    assert [o.name for o in proto.graph.output] == ["logits"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["headstart.classes"]) == CLASSES
    assert meta["headstart.input_spec"] == spec.to_json()
    assert "headstart.version" in meta
    assert not list(path.parent.glob("*.data"))  # weights inside the file, not external


def test_predictor_reads_metadata_and_providers(exported):
    _, spec, path = exported
    predictor = Predictor(path, providers=("CPUExecutionProvider",))
    assert "CPUExecutionProvider" in predictor.providers
    assert predictor.providers == predictor.session.get_providers()
    assert predictor.classes == CLASSES
    assert predictor.spec == spec


def test_predictor_default_providers_fall_back_to_cpu(exported):
    _, _, path = exported
    predictor = Predictor(path)  # TensorRT/CUDA first where they work; the CPU always
    assert "CPUExecutionProvider" in predictor.providers


def test_parity_with_torch(exported, images):
    classifier, _, path = exported
    result = parity(classifier, path, images, batch_size=2)
    assert result["n_images"] == len(images)
    assert result["top1_agreement"] == 1.0
    assert result["max_abs_logit_diff"] < 1e-4
    assert result["classes"] == CLASSES
    assert "CPUExecutionProvider" in result["providers"]


def test_parity_needs_images(exported):
    classifier, _, path = exported
    with pytest.raises(HeadstartError, match="at least one image"):
        parity(classifier, path, [], batch_size=2)


@pytest.mark.parametrize("n", [1, 3])
def test_predict_probabilities(exported, images, n):
    classifier, spec, path = exported
    predictor = Predictor(path, providers=("CPUExecutionProvider",))
    probs = predictor.predict(images[:n])
    assert probs.shape == (n, len(CLASSES))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    # the same probabilities as torch on the same pixels
    from headstart.preprocess import load_batch

    with torch.no_grad():
        ref = torch.softmax(classifier(torch.from_numpy(load_batch(images[:n], spec))), 1).numpy()
    np.testing.assert_allclose(probs, ref, atol=1e-5)


def test_predict_batches_agree(exported, images):
    _, _, path = exported
    predictor = Predictor(path, providers=("CPUExecutionProvider",))
    whole = predictor.predict(images, batch_size=32)
    pieces = predictor.predict(images, batch_size=2)
    np.testing.assert_allclose(whole, pieces, atol=1e-5)
    assert predictor.predict([]).shape == (0, len(CLASSES))


def test_softmax_is_stable():
    p = softmax(np.array([[1000.0, 1000.0], [0.0, -1000.0]]))
    np.testing.assert_allclose(p, [[0.5, 0.5], [1.0, 0.0]], atol=1e-12)


def test_predictor_without_metadata_raises(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["input"], ["logits"])
    graph = helper.make_graph(
        [node],
        "bare",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    path = tmp_path / "bare.onnx"
    onnx.save(model, path)
    with pytest.raises(HeadstartError, match="not a headstart model"):
        Predictor(path, providers=("CPUExecutionProvider",))


def test_predictor_missing_file_raises(tmp_path):
    with pytest.raises(HeadstartError, match="does not exist"):
        Predictor(tmp_path / "nope.onnx")


def test_runtime_does_not_import_torch():
    code = "import sys, headstart.runtime; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
