"""The serving pyfunc (headstart.serving): images in, the Predictor's answer out; every kind of bad
request refused with HTTP 400 and one line naming the row, through MLflow's own scoring app in process
(the slow test in tests/flows/test_serving.py starts the real `mlflow models serve`)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from PIL import Image

from headstart import serving
from headstart.runtime import Predictor
from tests.unit.imagebytes import bomb_png, truncated
from tests.unit.test_hostile_runtime import CLASSES, tiny_onnx


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


RED, GREEN, BLUE = png((220, 10, 10)), png((10, 220, 10)), png((10, 10, 220))


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    return tiny_onnx(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture(scope="module")
def model(onnx_file) -> serving.ImageClassifier:
    m = serving.ImageClassifier()
    m.load_context(SimpleNamespace(artifacts={"fp32": str(onnx_file)}, model_config={"max_images": 4}))
    return m


def frame(*blobs) -> pd.DataFrame:
    return pd.DataFrame({"image": list(blobs)})


def test_predict_answers_as_the_predictor_does(model, onnx_file, tmp_path):
    out = model.predict(None, frame(RED, GREEN, BLUE))
    assert [r["label"] for r in out] == CLASSES
    assert all(set(r) == {"label", "confidence", "probabilities", "abstain", "reason"} for r in out)
    files = []
    for i, blob in enumerate((RED, GREEN, BLUE)):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(blob)
    want = Predictor(onnx_file, providers="cpu").predict_files(files)
    for got, w in zip(out, want, strict=True):
        assert got["probabilities"] == pytest.approx(w.probabilities) and got["abstain"] is w.abstain
    raw = model.predict(None, frame(RED), params={"abstain": False})
    assert raw[0]["label"] == "red" and raw[0]["abstain"] is None  # the raw argmax, no decision


BAD = {
    "not an image": (frame(RED, b"hello, world"), r"^row 1: .*send encoded image files"),
    "truncated": (frame(truncated(RED), RED), r"^row 0: "),
    "empty": (frame(RED, GREEN, b""), r"^row 2: empty$"),
    "bomb": (frame(bomb_png()), r"^row 0: oversized: "),
    "text, not bytes": (frame("aGVsbG8="), r"^row 0: str, not image bytes"),
    "missing value": (frame(RED, None), r"^row 1: NoneType, not image bytes"),
    "wrong column": (pd.DataFrame({"img": [RED]}), r"^no column 'image' \(got \['img'\]\)"),
    "no rows": (frame(), r"^the request holds no images$"),
    "too many": (frame(*[RED] * 5), r"^5 images in one request; this model takes at most 4"),
}


@pytest.mark.parametrize("case", BAD)
def test_each_bad_request_is_refused_with_one_line_naming_the_row(model, case):
    data, reason = BAD[case]
    with pytest.raises(serving.BadRequest, match=reason) as err:
        model.predict(None, data)
    assert err.value.get_http_status_code() == 400 and "\n" not in err.value.message
    err.value.message = f"Failed to predict data '{data}'. \nError: {err.value.message}"  # as MLflow does
    assert "\n" not in err.value.message and "Failed" not in err.value.message


def test_two_bad_rows_name_the_first_and_count_the_rest(model):
    with pytest.raises(serving.BadRequest, match=r"^row 1: .*\(and 1 more bad rows\)"):
        model.predict(None, frame(RED, b"x", b"y"))


@pytest.fixture(scope="module")
def app(onnx_file, tmp_path_factory):
    """MLflow's scoring app (what `mlflow models serve` runs) on the model saved as register logs it."""
    import mlflow.pyfunc
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    root = tmp_path_factory.mktemp("pyfunc")
    code = root / "headstart_model.py"
    code.write_text(serving.MODEL_CODE)
    mlflow.pyfunc.save_model(
        root / "model",
        python_model=str(code),
        artifacts={"fp32": str(onnx_file)},
        signature=serving.signature(),
        model_config={**serving.DEFAULTS, "max_images": 4},
    )
    return TestClient(scoring_server.init(mlflow.pyfunc.load_model(str(root / "model"))))


def split(*blobs, column: str = "image") -> dict:
    data = [[base64.b64encode(b).decode()] for b in blobs]
    return {"dataframe_split": {"columns": [column], "data": data}}


def test_served_json_and_parquet(app):
    r = app.post("/invocations", json=split(RED, BLUE))
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == ["red", "blue"]
    buf = io.BytesIO()
    frame(GREEN).to_parquet(buf)
    r = app.post(
        "/invocations", content=buf.getvalue(), headers={"Content-Type": "application/vnd.apache.parquet"}
    )
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "green", r.text
    r = app.post("/invocations", json={**split(RED), "params": {"abstain": False}})
    assert r.status_code == 200 and r.json()["predictions"][0]["abstain"] is None, r.text


def test_served_bad_requests_get_4xx_and_the_next_good_one_succeeds(app):
    ours = {  # refused by the model: one line naming the row
        "not an image": (split(RED, b"not an image"), "row 1: "),
        "truncated": (split(truncated(RED)), "row 0: "),
        "empty image": (split(b""), "row 0: empty"),
        "bomb": (split(bomb_png()), "row 0: oversized: "),
        "too many": (split(*[RED] * 5), "5 images in one request"),
    }
    for case, (body, reason) in ours.items():
        r = app.post("/invocations", json=body)
        message = r.json()["message"]
        assert r.status_code == 400 and message.startswith(reason) and "\n" not in message, (case, r.text)
    # refused by MLflow before the model: its own 4xx and message
    mlflows = {
        "wrong column": dict(json=split(RED, column="img")),
        "empty body": dict(content=b"", headers={"Content-Type": "application/json"}),
        "not base64": dict(json={"dataframe_split": {"columns": ["image"], "data": [[12]]}}),
        "wrong content type": dict(content=RED, headers={"Content-Type": "image/png"}),
        "not parquet": dict(content=RED, headers={"Content-Type": "application/vnd.apache.parquet"}),
    }
    for case, kwargs in mlflows.items():
        r = app.post("/invocations", **kwargs)
        assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])
    r = app.post("/invocations", json=split(GREEN))
    assert r.status_code == 200 and json.loads(r.text)["predictions"][0]["label"] == "green"
