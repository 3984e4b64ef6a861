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
from headstart.export import export_onnx, parity, torch_reference
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
    labels = [i % 3 for i in range(len(images))]
    result = parity(classifier, path, images, (1, 2, 32), labels)
    assert result["n_images"] == len(images) and set(result["batch_sizes"]) == {"1", "2", "32"}
    assert result["top1_agreement"] == 1.0
    assert result["max_abs_logit_diff"] < 1e-4
    assert result["max_metric_diff"] == 0.0 and 0 <= result["accuracy_torch"] <= 1
    assert result["classes"] == CLASSES
    assert "CPUExecutionProvider" in result["providers"]
    # the export stage decodes and runs torch once for all its variants: the same figures
    _, spec, _ = exported
    shared = torch_reference(classifier, images, spec)
    assert parity(classifier, path, images, (1, 2, 32), labels, shared) == result


@pytest.mark.parametrize("kind,fp16", [("uint8", False), ("float32", True), ("uint8", True)])
def test_uint8_input_and_fp16_variants_match_torch(exported, images, tmp_path, kind, fp16):
    """uint8 NHWC in (normalised in the graph) and fp16 inside both serve the same predictions."""
    classifier, spec, _ = exported
    path = export_onnx(
        classifier, tmp_path / "m.onnx", spec, {"headstart.classes": json.dumps(CLASSES)}, 18, kind, fp16
    )
    predictor = Predictor(path, providers="cpu")
    assert predictor.input_kind == kind and predictor.metadata["headstart.precision"] == (
        "fp16" if fp16 else "fp32"
    )
    (inp,) = onnx.load(path).graph.input
    assert inp.type.tensor_type.elem_type == (
        onnx.TensorProto.UINT8 if kind == "uint8" else onnx.TensorProto.FLOAT
    )
    result = parity(classifier, path, images, (1, 7))
    assert result["top1_agreement"] == 1.0 and result["input"] == kind
    assert result["max_abs_logit_diff"] < (0.05 if fp16 else 1e-4)


def test_parity_needs_images(exported):
    classifier, _, path = exported
    with pytest.raises(HeadstartError, match="at least one image"):
        parity(classifier, path, [], (2,))


def test_predict_files_reports_unreadable_files_and_predicts_the_rest(exported, images, tmp_path):
    _, _, path = exported
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG truncated")
    results = Predictor(path, providers="cpu").predict_files([images[0], bad, images[1]], batch_size=2)
    assert [r.error is None for r in results] == [True, False, True]
    assert results[1].label is None and "bad.png" in results[1].path and results[1].error
    assert results[0].label in CLASSES and sum(results[0].probabilities.values()) == pytest.approx(1.0)


def test_provider_names():
    from headstart.runtime import DEFAULT_PROVIDERS, provider_list

    assert provider_list("cuda,cpu") == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert provider_list(None) == DEFAULT_PROVIDERS
    with pytest.raises(HeadstartError, match="unknown provider"):
        provider_list("tpu")


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


def test_runtime_does_not_import_torch_or_mlflow(exported, images):
    """With torch and mlflow made unimportable, the runtime still loads a model and predicts."""
    _, _, path = exported
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['mlflow'] = None\n"
        "from headstart.runtime import Predictor\n"
        f"p = Predictor({str(path)!r}, providers='cpu').predict([{str(images[0])!r}])\n"
        "assert p.shape == (1, 3) and abs(p.sum() - 1) < 1e-5\n"
        "loaded = {m.split('.')[0] for m, mod in sys.modules.items() if mod is not None}\n"
        "assert not {'torch', 'mlflow'} & loaded, loaded"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_near_tie_flips_do_not_count_against_the_gate_decisive_ones_do():
    """Two runtimes on a set built with near-ties: torch's top-2 margin of images 0 and 1 is 0.02,
    within what 0.05 of precision can move; image 2 is decided by a margin of 4."""
    from headstart.config import Tolerance
    from headstart.export import agreement, judge

    ours = np.array([[1.00, 0.98], [0.50, 0.52], [5.0, 1.0], [0.0, 3.0]])
    y = np.array([0, 1, 0, -1])  # the last image is not a test image: no label
    near_flips = ours + np.array([[-0.02, 0.02], [0.02, -0.02], [0, 0], [0, 0]])
    tol = Tolerance(max_abs_diff=0.05, min_top1_agreement=0.98, max_metric_diff=0.01)
    f = agreement(ours, near_flips, y, slack=tol.max_abs_diff)
    assert f["top1_agreement"] == 0.5 and f["near_ties"] == 2 and f["flipped_near_ties"] == 2
    assert f["decisive_top1_agreement"] == 1.0 and f["decisive_metric_diff"] == 0.0
    assert f["metric_diff"] == pytest.approx(2 / 3)  # reported as it is, not gated
    assert judge(_figures(f), tol) == []
    decisive_flip = ours.copy()
    decisive_flip[2] = [1.0, 5.0]
    f = agreement(ours, decisive_flip, y, slack=tol.max_abs_diff)
    failures = judge(_figures(f), tol)
    assert f["decisive_top1_agreement"] == pytest.approx(0.5) and len(failures) == 3
    assert failures[1].startswith("top-1 agreement beyond near-ties 0.5")
    # with no slack (exact runtimes expected), the same near-tie flips count
    assert agreement(ours, near_flips, y, slack=0.0)["decisive_top1_agreement"] == 0.5


def _figures(f: dict) -> dict:
    return {k: f[k] for k in ("max_abs_logit_diff", "decisive_top1_agreement", "decisive_metric_diff")}
