"""headstart.preprocess: decoding (EXIF, 16-bit) and the eval transform the backbone expects."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from headstart.preprocess import InputSpec, decode, load_batch, preprocess

SPEC = InputSpec(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875)


def test_resize_to_follows_crop_pct():
    assert InputSpec(224, (0, 0, 0), (1, 1, 1), crop_pct=0.875).resize_to == 256
    assert InputSpec(160, (0, 0, 0), (1, 1, 1), crop_pct=1.0).resize_to == 160


def test_preprocess_shape_and_dtype():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8))
    out = preprocess(img, SPEC)
    assert out.shape == (3, 64, 64)
    assert out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("v", [0, 77, 128, 255])
def test_preprocess_normalises_uniform_grey(v):
    img = Image.new("RGB", (90, 70), (v, v, v))
    out = preprocess(img, SPEC)
    for c in range(3):
        expected = (v / 255.0 - SPEC.mean[c]) / SPEC.std[c]
        np.testing.assert_allclose(out[c], expected, atol=1e-5)


def test_preprocess_channel_order_is_rgb():
    img = Image.new("RGB", (64, 64), (255, 0, 0))
    out = preprocess(img, InputSpec(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    np.testing.assert_allclose(out[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[1:], 0.0, atol=1e-6)


@pytest.mark.parametrize("size", [(12, 5), (5, 12), (1, 1), (300, 20)])
def test_preprocess_small_and_non_square(size):
    img = Image.new("RGB", size, (10, 200, 30))
    out = preprocess(img, SPEC)
    assert out.shape == (3, 64, 64)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[1], (200 / 255 - SPEC.mean[1]) / SPEC.std[1], atol=1e-4)


def test_preprocess_centre_crops():
    # left third black, middle white, right third black: the centre crop sees only white
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255
    spec = InputSpec(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "nearest", 1.0)
    out = preprocess(Image.fromarray(arr), spec)
    # resized to 96 x 32, the crop is columns 32..64 of 96: exactly the white band
    np.testing.assert_allclose(out, 1.0)


def test_decode_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (60, 30), (120, 30, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (60, 30)
    decoded = decode(path)
    assert decoded.size == (30, 60)
    assert decoded.mode == "RGB"


def test_decode_16bit_grey_scales_not_clips(tmp_path):
    ramp = np.linspace(0, 4000, 64 * 32).reshape(32, 64).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)  # uint16 -> mode I;16
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I;16B", "I;16L", "I")
    decoded = decode(path)
    assert decoded.mode == "RGB"
    arr = np.asarray(decoded)
    assert arr.max() == 255
    assert arr.min() == 0
    assert (arr == 255).mean() < 0.05  # a ramp, not a white sheet
    assert len(np.unique(arr)) > 100
    # monotonic along the ramp
    row = arr[:, :, 0].ravel().astype(int)
    assert (np.diff(row) >= 0).all()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_decode_other_modes_give_rgb(tmp_path, mode):
    img = Image.new("RGB", (20, 10), (50, 100, 150)).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    out = decode(path)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_decode_refuses_non_image(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"not an image")
    with pytest.raises(Exception):  # noqa: B017 - Pillow's UnidentifiedImageError
        decode(path)


def test_input_spec_json_roundtrip():
    spec = InputSpec(160, (0.5, 0.25, 0.125), (0.1, 0.2, 0.3), "bilinear", 0.95)
    back = InputSpec.from_json(spec.to_json())
    assert back == spec
    assert isinstance(back.mean, tuple) and isinstance(back.std, tuple)
    assert hash(back) == hash(spec)


def test_load_batch_stacks(tmp_path):
    paths = []
    for i, v in enumerate((0, 128, 255)):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 50), (v, v, v)).save(p)
        paths.append(p)
    batch = load_batch(paths, SPEC)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == np.float32
    assert batch[0, 0, 0, 0] < batch[1, 0, 0, 0] < batch[2, 0, 0, 0]


def test_decode_float_image_with_negative_values_is_rescaled(tmp_path):
    arr = np.linspace(-5.0, 5.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    path = tmp_path / "float.tif"
    Image.fromarray(arr).save(path)  # float32 -> mode F
    rgb = np.asarray(decode(path))
    assert rgb.shape == (64, 64, 3)
    assert rgb.min() == 0 and rgb.max() >= 254  # the full range survives, nothing wraps around
    assert rgb[0, 0, 0] < rgb[-1, -1, 0]
