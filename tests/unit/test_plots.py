"""headstart.plots: each figure is a real PNG, drawn in a child process, so pyplot never enters the
caller's (the flow's) process."""

from __future__ import annotations

import importlib
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


def test_a_prewarmed_child_draws_any_figure_and_the_next_one_starts_afresh(monkeypatch):
    """plots.prewarm starts one child that imports pyplot ahead; the next figure, whichever it is,
    is drawn in it (no second child started), the same PNG as drawn in a fresh child; the figure
    after that, with no prewarm, starts its own."""
    from headstart import plots
    from headstart.ops import isolate

    spawned = []
    real = isolate._spawn
    monkeypatch.setattr(isolate, "_spawn", lambda *m: spawned.append(m) or real(*m))
    cm = np.array([[3, 0], [1, 4]])
    plots.prewarm()
    assert spawned == [(("matplotlib.pyplot", "headstart.plots"),)]
    png = drawn("confusion_matrix", cm, ["a", "b"], "t")
    assert len(spawned) == 1 and plots.SPARE not in isolate._spares
    assert png == drawn("confusion_matrix", cm, ["a", "b"], "t") and len(spawned) == 2


def test_the_stages_that_draw_are_the_ones_the_flow_starts_a_plotting_child_for():
    """A stage marked `draws` is one whose code draws through headstart.plots, and every such stage
    is marked: the flow starts their plotting child as they start."""
    import inspect

    from headstart.stages import STAGES

    for stage in STAGES:
        source = inspect.getsource(importlib.import_module(stage.target.partition(":")[0]))
        if stage.name == "report":
            source += inspect.getsource(importlib.import_module("headstart.report"))
        assert stage.draws == ("drawn(" in source), stage.name
