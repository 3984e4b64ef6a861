"""Hostile input to the runtime (issue 14, defects 5, 6, 12, 14): bounded work per image, only regular
files read, metadata checked against the graph, predict's plain output unforgeable, no stray mlflow.db.

The model is a hand-built ONNX graph (channel means -> a matrix), so these tests need no torch export."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from headstart import HeadstartError
from headstart.cli import main
from headstart.preprocess import MAX_PIXELS, ImageRefused, InputSpec, decode, resize_crop
from headstart.runtime import Predictor, tsv_field

ROOT = Path(__file__).parents[2]
CLASSES = ["red", "green", "blue"]
SPEC = InputSpec(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # 224 px: the size that made 1x40000 a bomb


def tiny_onnx(
    path: Path,
    classes: list[str] = CLASSES,
    spec: InputSpec = SPEC,
    width: int | None = None,
    side: int | None = None,
    meta: dict[str, str] | None = None,
) -> Path:
    """A headstart-shaped model: float N,3,S,S -> channel means -> logits N,width. `width` and `side`
    default to what the metadata says; setting them makes graph and metadata disagree."""
    width, side = width or len(classes), side or spec.size
    weights = np.eye(3, width, dtype=np.float32) * 10
    nodes = [
        helper.make_node("ReduceMean", ["input", "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, side, side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", width])],
        [
            helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
            onnx.numpy_helper.from_array(weights, "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    props = {"headstart.classes": json.dumps(classes), "headstart.input_spec": spec.to_json()}
    helper.set_model_props(model, {**props, "headstart.input": "float32", **(meta or {})})
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_onnx(tmp_path_factory.mktemp("model") / "model.onnx")


def red(path: Path, size: tuple[int, int] = (48, 40)) -> Path:
    Image.new("RGB", size, (220, 10, 10)).save(path)
    return path


def predict(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = main(["predict", *argv])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def png_header_claiming(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header claims width x height: only the header is honest enough to open."""
    red(path, (1, 1))
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


# --- 5: the work per image is bounded before decoding and resizing ---------------------------


def _peak_rss_kb(model: Path, image: Path) -> tuple[int, str]:
    """`headstart predict` in a fresh process; its own peak RSS, so no other test's memory counts."""
    code = (
        "import resource, sys\n"
        "from headstart.cli import main\n"
        f"rc = main(['predict', '--model', {str(model)!r}, '--providers', 'cpu', {str(image)!r}])\n"
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    peak = [line for line in run.stdout.splitlines() if line.startswith("PEAK")]
    assert peak, run.stderr
    _, kb, rc = peak[0].split()
    return int(kb), rc + "\n" + run.stdout


def test_a_1x40000_strip_is_predicted_in_bounded_memory(model, tmp_path):
    """Resizing the short side to 256 px used to make the whole 256 x 10,240,000 image (2.6 GB grey,
    7.9 GB RGB) before the crop; now only the crop is resampled."""
    strip = tmp_path / "strip.png"
    Image.fromarray(np.full((40_000, 1, 3), (200, 30, 30), np.uint8)).save(strip)
    baseline, _ = _peak_rss_kb(model, red(tmp_path / "normal.png"))
    peak, out = _peak_rss_kb(model, strip)
    assert out.startswith("0\n") and f"{strip}\tred\t" in out
    assert peak - baseline < 300 * 1024, f"peak RSS {peak} KB vs {baseline} KB for a normal image"


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(451, 300), (300, 451), (64, 48), (640, 640)])
def test_resampling_only_the_crop_gives_the_pixels_of_resize_then_crop(interpolation, size):
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = Image.fromarray(((np.sin(xx / 7) + np.cos(yy / 11) + 2) * 60).astype(np.uint8))
    spec = InputSpec(224, (0.5,) * 3, (0.5,) * 3, interpolation)
    scale = spec.resize_to / min(w, h)
    new_w, new_h = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
    left, top = (new_w - spec.size) // 2, (new_h - spec.size) // 2
    resample = Image.Resampling[interpolation.upper()]
    full = img.resize((new_w, new_h), resample).crop((left, top, left + spec.size, top + spec.size))
    got = np.asarray(resize_crop(img, spec), np.int16)
    assert got.shape == (224, 224)
    assert np.abs(got - np.asarray(full, np.int16)).max() <= 1


@pytest.mark.parametrize("width,height", [(10_000, 10_000), (20_000, 20_000), (1, MAX_PIXELS + 1)])
def test_too_many_pixels_are_refused_from_the_header_before_decoding(model, tmp_path, capsys, width, height):
    """Under and over Pillow's own limit (twice MAX_PIXELS): one reason, no decoding attempted."""
    bomb = png_header_claiming(tmp_path / "bomb.png", width, height)
    with pytest.raises(ImageRefused, match="^oversized: "):
        decode(bomb)
    code, lines, _ = predict(capsys, "--model", str(model), str(bomb), str(red(tmp_path / "ok.png")))
    assert code == 1 and lines[1].startswith(f"{tmp_path / 'ok.png'}\tred\t")
    path, kind, reason = lines[0].split("\t")
    assert (path, kind) == (str(bomb), "error") and reason.startswith("oversized: ")


# --- 6: only regular files are read -----------------------------------------------------------


def test_predict_on_a_fifo_says_why_and_goes_on(model, tmp_path):
    """A FIFO given directly, a symlink to one, and one met while walking a folder: none blocks."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")
    (tmp_path / "link.png").symlink_to(folder / "pipe.png")
    good = red(folder / "good.png")
    argv = [
        "predict",
        "--model",
        str(model),
        str(folder / "pipe.png"),
        str(tmp_path / "link.png"),
        str(folder),
    ]
    code = f"import sys; from headstart.cli import main; sys.exit(main({argv!r}))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 1, run.stderr
    why = "not a regular file (a FIFO); only regular files are read"
    lines = run.stdout.splitlines()
    assert len(lines) == 4 and lines[2].startswith(f"{good}\tred\t")
    assert [lines[i] for i in (0, 1, 3)] == [
        f"{folder / 'pipe.png'}\terror\t{why}",
        f"{tmp_path / 'link.png'}\terror\t{why}",
        f"{folder / 'pipe.png'}\terror\t{why}",
    ]


def test_decode_refuses_a_device_and_a_folder(tmp_path):
    with pytest.raises(ImageRefused, match="a character device"):
        decode("/dev/zero")
    with pytest.raises(ImageRefused, match="a folder"):
        decode(tmp_path)


# --- 12: metadata that disagrees with the graph -----------------------------------------------


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"width": 5}, "headstart.classes"),
        ({"side": 64}, "headstart.input_spec"),
        ({"meta": {"headstart.classes": "[not json"}}, "headstart.classes"),
        ({"meta": {"headstart.classes": '{"a": 1}'}}, "headstart.classes"),
        ({"meta": {"headstart.input_spec": '{"size": 224}'}}, "headstart.input_spec"),
        (
            {"meta": {"headstart.input_spec": SPEC.to_json().replace("224", "1000000000")}},
            "headstart.input_spec",
        ),
        ({"meta": {"headstart.input": "uint8"}}, "headstart.input"),
        ({"meta": {"headstart.input": "int4"}}, "headstart.input"),
    ],
)
def test_metadata_disagreeing_with_the_graph_is_one_line_naming_file_and_key(tmp_path, capsys, kwargs, key):
    bad = tiny_onnx(tmp_path / "bad.onnx", **kwargs)
    with pytest.raises(HeadstartError, match=key.replace(".", r"\.")) as err:
        Predictor(bad, providers="cpu")
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    code, lines, stderr = predict(capsys, "--model", str(bad), str(red(tmp_path / "x.png")))
    assert code == 2 and lines == [] and stderr.startswith("headstart: error: ") and stderr.count("\n") == 1


def test_agreeing_metadata_loads(model):
    p = Predictor(model, providers="cpu")
    assert p.classes == CLASSES and p.spec == SPEC and p.input_kind == "float32"


# --- 14: an output that cannot be forged; no mlflow.db out of nowhere ---------------------------


def _unescape(field: str) -> str:
    return field.encode("latin-1", "backslashreplace").decode("unicode_escape")


def test_tabs_and_newlines_in_names_cannot_forge_fields_or_lines(tmp_path, capsys):
    weird = ["tab\there.png", "new\nline.png", "back\\slash\tred\t1.0000.png", "cr\rlf.png", "ls\u2028x.png"]
    files = [red(tmp_path / name) for name in weird]
    model = tiny_onnx(tmp_path / "m.onnx", classes=["r\te\nd", "green", "blue"])
    code, lines, _ = predict(capsys, "--model", str(model), *map(str, files))
    assert code == 0 and len(lines) == len(weird)
    for line, file in zip(lines, files, strict=True):
        fields = line.split("\t")
        assert len(fields) == 3 and _unescape(fields[0]) == str(file)
        assert fields[1] == "r\\te\\nd" and float(fields[2]) > 0.3


def test_an_undecodable_file_name_is_printed_as_its_bytes(model, tmp_path, capsys):
    name = os.fsencode(tmp_path) + b"/caf\xe9.png"  # Latin-1 bytes: not UTF-8
    red(tmp_path / "src.png").rename(os.fsdecode(name))
    code, lines, _ = predict(capsys, "--model", str(model), str(tmp_path))
    assert code == 0 and lines[0].startswith(f"{tmp_path}/caf\\xe9.png\tred\t")
    assert tsv_field("a\\b\x00\x85") == "a\\\\b\\x00\\x85"


def test_models_uri_in_an_empty_folder_creates_no_store(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, lines, stderr = predict(capsys, "--model", "models:/tiny/1", str(red(tmp_path / "x.png")))
    assert code == 2 and lines == []
    assert stderr == (
        "headstart: error: no MLflow store at sqlite:///mlflow.db; "
        "set --set mlflow.tracking_uri=... or MLFLOW_TRACKING_URI\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
