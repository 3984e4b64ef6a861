"""`headstart run` on scikit-learn's 8x8 digits: a domain mismatch for an ImageNet backbone, so the
from-scratch model trains, selection records its reason, the chosen model is exported, parity-gated
and registered, and `headstart predict` serves the exported file.

The digits are what scikit-learn ships: 8x8 grey images, written as PNGs, under the default params
(8x8 is above validate.min_size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_params

pytestmark = [pytest.mark.slow, pytest.mark.pretrained]

CLASSES = (0, 1, 7)


def digits_folder(root: Path, per_class: int = 60) -> Path:
    """8x8 grey digits, 3 classes (so the scratch model takes 1 channel)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in CLASSES:
        for i, img in enumerate(d.images[d.target == c][:per_class]):
            (root / f"digit_{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray((img * 255 / 16).astype(np.uint8), "L").save(root / f"digit_{c}" / f"{i:03d}.png")
    return root


def test_digits_mismatch_trains_scratch_selects_exports_and_predicts(tmp_path):
    data = digits_folder(tmp_path / "digits")
    params = write_params(
        tmp_path / "params.yaml",
        [
            f"project.artifacts_dir={tmp_path / 'artifacts'}",
            f"project.cache_dir={tmp_path / 'cache'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"mlflow.artifact_location={tmp_path / 'mlruns'}",
            "register.model_name=digits",
            "export.fp16=false",
            "scratch.max_epochs=15",
        ],
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    cli = [sys.executable, "-m", "headstart.cli"]
    out = subprocess.run(
        [*cli, "run", "--data", str(data), "--params", str(params)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    art = tmp_path / "artifacts"
    assert json.loads((art / "domain" / "report.json").read_text())["verdict"] == "mismatch"
    scratch = json.loads((art / "scratch" / "decision.json").read_text())
    assert scratch["ran"] and "domain verdict mismatch" in scratch["reason"]
    select = json.loads((art / "select" / "decision.json").read_text())
    assert len(select["candidates"]) == 2 and select["reason"]
    assert json.loads((art / "export" / "parity.json").read_text())["passed"]
    assert json.loads((art / "register" / "run.json").read_text())["model_version"] == "1"
    gain = json.loads((art / "evaluate" / "metrics.json").read_text())["transfer_gain"]
    assert gain["measured"]
    lines = ("scratch     trained", "select      ", "transfer gain  ", "promotion   v1 -> champion")
    for line in (*lines, "calibrate   temperature", "abstention  set coverage"):
        assert line in out.stdout, out.stdout[-2000:]  # a mismatch answered by selection is promotable
    image = next((data / "digit_7").iterdir())
    pred = subprocess.run(
        [*cli, "predict", "--model", str(art / "export" / "model.onnx"), "--json", str(image)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert pred.returncode == 0, pred.stderr
    assert json.loads(pred.stdout)["label"] in {f"digit_{c}" for c in CLASSES}
