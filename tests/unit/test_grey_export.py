"""A grey (1-channel) model end to end: ONNX export of both input kinds and fp16, parity with torch,
and the torch-free Predictor serving grey and colour PNG files with torch's probabilities."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from headstart import HeadstartError
from headstart.export import export_onnx, parity
from headstart.preprocess import InputSpec, decode, normalise, resize_crop, to_uint8
from headstart.runtime import Predictor
from headstart.scratch import resnet

CLASSES = ["dark", "mid", "light"]
SPEC = InputSpec(32, (0.45,), (0.22,), "bicubic", 1.0, 1)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """Grey (L) and colour (RGB) PNGs of several sizes and aspect ratios."""
    root, rng, out = tmp_path_factory.mktemp("grey_imgs"), np.random.default_rng(0), []
    for i, (w, h) in enumerate([(40, 32), (8, 8), (90, 200), (33, 33), (64, 48), (120, 40)]):
        shape = (h, w) if i % 2 == 0 else (h, w, 3)
        arr = np.clip(rng.normal(60 + 30 * i, 40, shape), 0, 255).astype(np.uint8)
        out.append(root / f"{i}.png")
        Image.fromarray(arr).save(out[-1])
    return out


@pytest.fixture(scope="module")
def grey_model(pngs):
    """A ResNet-8 for grey images with non-trivial BatchNorm statistics, its last layer solved so that
    image i scores class i % 3 clearly: a random network's logits barely differ between images."""
    torch.manual_seed(0)
    model = resnet(1, len(CLASSES), SPEC.size, depth=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        model.eval()
        features = model[:-1](torch.from_numpy(_inputs(pngs)))
        target = 6.0 * torch.eye(3)[[i % 3 for i in range(len(pngs))]]  # image i -> class i % 3
        weight = (torch.linalg.pinv(features - features.mean(0)) @ (target - target.mean(0))).T
        model[-1].weight.copy_(weight)
        model[-1].bias.copy_(target.mean(0) - weight @ features.mean(0))
    return model


def _inputs(paths) -> np.ndarray:
    return np.stack([normalise(to_uint8(decode(p, keep_grey=True), SPEC), SPEC) for p in paths])


def _export(model, path, kind="float32", fp16=False):
    return export_onnx(model, path, SPEC, {"headstart.classes": json.dumps(CLASSES)}, 18, kind, fp16)


def test_to_uint8_has_the_spec_channels_and_colour_turns_grey_as_in_training(pngs):
    rgb = decode(pngs[1], keep_grey=True)
    assert rgb.mode == "RGB"
    grey = to_uint8(rgb, SPEC)
    assert grey.shape == (32, 32, 1) and grey.dtype == np.uint8
    # the same pixels as Pillow's own RGB -> L before the same resize (what scratch training sees)
    np.testing.assert_array_equal(grey[:, :, 0], np.asarray(resize_crop(rgb.convert("L"), SPEC)))
    assert normalise(grey, SPEC).shape == (1, 32, 32)
    rgb_spec = InputSpec(32, (0.5,) * 3, (0.5,) * 3, "bicubic", 1.0)
    assert to_uint8(decode(pngs[0], keep_grey=True), rgb_spec).shape == (32, 32, 3)  # grey repeated


@pytest.mark.parametrize("kind", ["float32", "uint8"])
@pytest.mark.parametrize("fp16", [False, True])
def test_grey_model_exports_passes_parity_and_serves(grey_model, pngs, tmp_path, kind, fp16):
    path = _export(grey_model, tmp_path / "grey.onnx", kind, fp16)
    (inp,) = onnx.load(path).graph.input
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
    assert dims == ([1, 32, 32] if kind == "float32" else [32, 32, 1])
    predictor = Predictor(path, providers="cpu")
    assert predictor.spec == SPEC and predictor.input_kind == kind and predictor.classes == CLASSES
    assert "grey (1 channel)" in predictor.metadata["headstart.input_layout"]
    result = parity(grey_model, path, pngs, (1, 4))
    assert result["top1_agreement"] == 1.0 and result["input"] == kind
    assert result["max_abs_logit_diff"] < (0.05 if fp16 else 1e-4)
    # grey and colour files: the probabilities torch gives on the same preprocessing
    with torch.no_grad():
        ref = torch.softmax(grey_model(torch.from_numpy(_inputs(pngs))), 1).numpy()
    assert len(set(ref.argmax(1).tolist())) == 3  # the model tells the images apart
    np.testing.assert_allclose(predictor.predict(pngs, 4), ref, atol=0.02 if fp16 else 1e-5)
    files = predictor.predict_files(pngs, batch_size=4)
    assert [r.error for r in files] == [None] * len(pngs)
    assert [r.label for r in files] == [CLASSES[k] for k in ref.argmax(1)]


def test_grey_metadata_is_checked_against_the_graph(grey_model, tmp_path):
    """A grey spec on a graph that takes 3 channels (or the reverse) is a damaged file, refused."""
    path = _export(grey_model, tmp_path / "grey.onnx")
    proto = onnx.load(path)
    for prop in proto.metadata_props:
        if prop.key == "headstart.input_spec":
            prop.value = InputSpec(32, (0.5,) * 3, (0.5,) * 3, "bicubic", 1.0).to_json()
    onnx.save(proto, tmp_path / "rgb_meta.onnx")
    with pytest.raises(HeadstartError, match=r"N,3,S,S float.*\[.*1, 32, 32\]"):
        Predictor(tmp_path / "rgb_meta.onnx", providers="cpu")
    for prop in proto.metadata_props:
        if prop.key == "headstart.input_spec":
            prop.value = json.dumps({**json.loads(SPEC.to_json()), "mean": [0.5, 0.5, 0.5]})
    onnx.save(proto, tmp_path / "bad_mean.onnx")
    with pytest.raises(HeadstartError, match="one mean/std per channel"):
        Predictor(tmp_path / "bad_mean.onnx", providers="cpu")


def test_three_channel_spec_json_and_layout_unchanged():
    """What every RGB model already carries stays byte-identical (cache keys, registered files)."""
    from headstart.export import LAYOUTS

    rgb = InputSpec(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert "channels" not in rgb.to_json()
    assert LAYOUTS["uint8"] == "NHWC uint8 RGB (0-255), resized and centre-cropped; the graph normalises"
