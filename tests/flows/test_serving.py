"""The registered champion served as it is: `mlflow models serve -m models:/NAME@champion` on loopback
answers a posted PNG (base64 JSON and parquet) with the label `headstart predict` gives; every bad
request gets a 4xx with one line and the server lives on."""

from __future__ import annotations

import base64
import io
import json

import mlflow
import pandas as pd
import pytest
import requests

from headstart.cli import main
from headstart.ops.model_server import served
from tests.tasks.test_stages import pipeline  # noqa: F401  (the module's pipeline, reused)
from tests.unit.imagebytes import bomb_png, truncated

pytestmark = pytest.mark.slow  # a pipeline to register, and a server start (~20 s on 2 cores)


def split(*blobs: bytes, column: str = "image") -> dict:
    return {"dataframe_split": {"columns": [column], "data": [[base64.b64encode(b).decode()] for b in blobs]}}


def test_the_champion_served_over_http_answers_as_predict(pipeline, tmp_path, capsys):  # noqa: F811
    cfg, r = pipeline
    name, uri = cfg.register.model_name, cfg.mlflow.tracking_uri
    mlflow.MlflowClient(uri, registry_uri=uri).set_registered_model_alias(
        name, "champion", r["register"].model_version
    )
    image = cfg.prepare.data_dir / "owl" / "owl_000.png"
    args = ["predict", "--model", f"models:/{name}@champion", "--set", f"mlflow.tracking_uri={uri}"]
    assert main([*args, "--json", str(image)]) == 0
    want = json.loads(capsys.readouterr().out)

    with served(f"models:/{name}@champion", uri, tmp_path / "serve.log") as (url, _):
        post = f"{url}/invocations"
        got = requests.post(post, json=split(image.read_bytes()), timeout=60)
        assert got.status_code == 200, got.text
        answer = got.json()["predictions"][0]
        assert answer["label"] == want["label"]
        assert answer["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
        assert answer["abstain"] == want.get("abstain")
        buf = io.BytesIO()
        pd.DataFrame({"image": [image.read_bytes()]}).to_parquet(buf)
        got = requests.post(
            post, data=buf.getvalue(), headers={"Content-Type": "application/vnd.apache.parquet"}, timeout=60
        )
        assert got.status_code == 200 and got.json()["predictions"][0]["label"] == want["label"], got.text

        png = image.read_bytes()
        bad = {
            "not an image": dict(json=split(png, b"<html>not an image</html>")),
            "truncated": dict(json=split(truncated(png))),
            "empty image": dict(json=split(b"")),
            "decompression bomb": dict(json=split(bomb_png())),
            "10,000 images": dict(json=split(*[png] * 10_000)),
            "wrong column": dict(json=split(png, column="picture")),
            "empty body": dict(data=b"", headers={"Content-Type": "application/json"}),
            "wrong content type": dict(data=png, headers={"Content-Type": "image/png"}),
        }
        for case, kwargs in bad.items():
            got = requests.post(post, timeout=60, **kwargs)
            assert 400 <= got.status_code < 500, (case, got.status_code, got.text[:300])
            if got.headers.get("content-type", "").startswith("application/json") and case not in (
                "wrong column",
                "empty body",
            ):  # the model's own refusals: one line naming the row (or the count)
                message = got.json()["message"]
                assert "\n" not in message and ("row " in message or "images" in message), (case, message)
        got = requests.post(post, json=split(png), timeout=60)  # still up, still right
        assert got.status_code == 200 and got.json()["predictions"][0]["label"] == want["label"]
