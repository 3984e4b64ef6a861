"""headstart.plots: each figure is a real PNG, drawn in a child process, so pyplot never enters the
caller's (the flow's) process."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from headstart.plots import confusion_matrix, drawn

PROFILE = [{"divergence": d} for d in (0.1, 0.3, 0.2, 0.5)]
THRESHOLDS = {"shifted_at": 0.4, "mismatch_at": 0.8}
CURVES = {
    "head": [
        {"train_loss": 1.0 / (i + 1), "val_loss": 1.2 / (i + 1), "val_accuracy": i / 5} for i in range(5)
    ]
}


def _size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return img.size


def test_each_figure_is_a_png_drawn_in_a_child():
    w, h = _size(drawn("domain_profile", PROFILE, THRESHOLDS, "lite0: ok", [0.1, -0.2, 0.3], [0.9, 1.1, 1.0]))
    assert w > 500 and h > 200
    assert min(_size(drawn("confusion_matrix", np.array([[5, 1], [2, 7]]), ["cat", "dog"], "test"))) > 100
    assert min(_size(drawn("training_curves", CURVES))) > 100


def test_the_child_draws_what_the_function_draws():
    cm = np.array([[3, 0, 1], [0, 4, 0], [2, 0, 5]])
    assert drawn("confusion_matrix", cm, ["a", "b", "c"], "t") == confusion_matrix(cm, ["a", "b", "c"], "t")


def test_pyplot_stays_out_of_the_callers_process():
    code = (
        "import sys; from headstart.plots import drawn; "
        "png = drawn('training_curves', {'head': [{'train_loss': 1.0, 'val_accuracy': 0.5}]}); "
        "print(png[:4] == b'\\x89PNG', 'matplotlib' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert out.stdout.split() == ["True", "False"]
