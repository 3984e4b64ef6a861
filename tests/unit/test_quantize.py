"""headstart.quantize: the INT8 variant, quantized from the fp32 file and held to its own gate."""

from __future__ import annotations

import json

import onnx
import pandas as pd
import pytest
import torch
from PIL import Image

from headstart import HeadstartError
from headstart.backbones import load_backbone
from headstart.config import Tolerances
from headstart.export import export_onnx, judge, parity
from headstart.quantize import calibration_images, quantize_int8, trunk_nodes
from headstart.runtime import Predictor
from headstart.training import Classifier, make_head
from tests.conftest import COLOURS, TINY_BACKBONE, make_image

CLASSES = ["red", "green", "blue"]
INT8 = Tolerances().int8  # the defaults params.yaml ships


@pytest.fixture(scope="module")
def fp32(tiny_weights, tmp_path_factory):
    """(classifier, input spec, fp32 ONNX path): the tiny backbone, a head scaled up (visible logits)."""
    backbone = load_backbone(TINY_BACKBONE, weights=tiny_weights[0], weights_sha256=tiny_weights[1])
    torch.manual_seed(0)
    head = make_head(backbone.num_features, len(CLASSES), 16, 0.0)
    with torch.no_grad():  # the random backbone's features are tiny: logits spread like a trained head's
        head[0].weight.mul_(100.0)
        head[-1].weight.mul_(50.0)
    classifier = Classifier(backbone.feature_extractor(), head.eval()).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    meta = {"headstart.classes": json.dumps(CLASSES)}
    return classifier, backbone.spec, export_onnx(classifier, path, backbone.spec, meta, opset=18)


def _images(root, n: int, offset: int = 0) -> list:
    return [make_image(root / f"{i}.png", COLOURS[i % 3], seed=offset + i, size=(48, 40)) for i in range(n)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """(calibration images, other images to hold the variant to): disjoint, three colours each."""
    root = tmp_path_factory.mktemp("imgs")
    return _images(root / "train", 24), _images(root / "test", 24, offset=100)


def test_int8_passes_its_gate_and_keeps_the_contract(fp32, images, tmp_path):
    classifier, _, path = fp32
    calibration, held = images
    out = tmp_path / "variants" / "model_int8.onnx"
    made = quantize_int8(path, out, calibration)
    assert made == {"calibration_images": 24, "calibration_skipped": []}
    f = parity(classifier, out, held, (1, 7), [i % 3 for i in range(len(held))], slack=INT8.max_abs_diff)
    assert judge(f, INT8) == []
    assert 1e-4 < f["max_abs_logit_diff"] < INT8.max_abs_diff  # quantized, and close
    proto, original = onnx.load(out), onnx.load(path)
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) > 10
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta == {p.key: p.value for p in original.metadata_props} | {"headstart.precision": "int8"}
    assert out.stat().st_size < 0.6 * path.stat().st_size  # int8 weights in the trunk, fp32 in the head
    predictor = Predictor(out, providers="cpu")
    assert predictor.classes == CLASSES and predictor.metadata["headstart.precision"] == "int8"


def test_int8_calibrated_on_constant_images_fails_the_gate(fp32, images, tmp_path):
    """A deliberately broken calibration (one flat grey image, over and over) sets activation ranges
    that real images overflow: the gate says so."""
    classifier, _, path = fp32
    _, held = images
    flat = tmp_path / "flat.png"
    Image.new("RGB", (48, 40), (128, 128, 128)).save(flat)
    out = tmp_path / "int8.onnx"
    quantize_int8(path, out, [flat] * 16)
    f = parity(classifier, out, held, (1, 7), [i % 3 for i in range(len(held))], slack=INT8.max_abs_diff)
    failures = judge(f, INT8)
    assert failures and any(x.startswith("max abs logit diff") for x in failures), f


def test_calibration_images_that_fail_to_decode_are_skipped_and_counted(fp32, images, tmp_path):
    _, _, path = fp32
    calibration, _ = images
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    made = quantize_int8(path, tmp_path / "int8.onnx", [*calibration[:8], broken, tmp_path / "gone.png"])
    assert made["calibration_images"] == 8
    assert made["calibration_skipped"] == [
        "broken.png: UnidentifiedImageError",
        "gone.png: FileNotFoundError",
    ]
    with pytest.raises(HeadstartError, match=r"int8 calibration: none of the 1 training images decoded"):
        quantize_int8(path, tmp_path / "none.onnx", [broken])
    assert not (tmp_path / "none.onnx").exists()


def test_only_the_convolutional_trunk_is_quantized(fp32):
    """The head (Gemm) and anything after the pooled features stay fp32."""
    _, _, path = fp32
    proto = onnx.load(path)
    trunk = set(trunk_nodes(proto))
    ops = {n.name: n.op_type for n in proto.graph.node}
    assert "Gemm" in ops.values() and "Gemm" not in {ops[n] for n in trunk}
    assert sum(op == "Conv" for op in ops.values()) == sum(ops[n] == "Conv" for n in trunk) > 10


def test_calibration_sample_is_training_images_chosen_by_content():
    frame = pd.DataFrame(
        {
            "path": [f"{i}.png" for i in range(10)],
            "split": ["train"] * 6 + ["val", "test", "test", "val"],
            "sha256": [f"{9 - i:02d}" for i in range(10)],
        }
    )
    sample = calibration_images(frame, 4)
    assert list(sample["path"]) == ["5.png", "4.png", "3.png", "2.png"]  # lowest hashes, train only
    assert list(calibration_images(frame.sample(frac=1.0, random_state=0), 4)["path"]) == list(sample["path"])
    assert len(calibration_images(frame, 100)) == 6


def test_uint8_input_quantizes_too(fp32, images, tmp_path):
    """A model that normalises in the graph (export.input uint8) gets the same treatment."""
    classifier, spec, _ = fp32
    calibration, held = images
    meta = {"headstart.classes": json.dumps(CLASSES)}
    path = export_onnx(classifier, tmp_path / "m.onnx", spec, meta, 18, "uint8")
    out = tmp_path / "int8.onnx"
    quantize_int8(path, out, calibration)
    f = parity(classifier, out, held, (7,), slack=INT8.max_abs_diff)
    assert f["input"] == "uint8" and judge(f, INT8) == [] and f["max_abs_logit_diff"] > 1e-4
