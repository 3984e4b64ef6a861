"""Few images of many classes, under the real backbone and the default params: 10 classes of 12 and
of 20 real images (elpv's cells by type and defect probability, and lfw's faces and non-faces) train,
register and become champion; two classes with labels drawn at random end at evaluate with `no signal`
and register nothing."""

from __future__ import annotations

import os
import random
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_params

pytestmark = [pytest.mark.slow, pytest.mark.pretrained]


def _elpv() -> list[tuple[str, Path]]:
    """(type and defect probability in thirds, file) for every elpv cell: 8 classes."""
    root = resources.files("elpv_dataset") / "data"
    rows = [line.split() for line in (root / "labels.csv").read_text().splitlines() if line.strip()]
    return [(f"{kind}_{round(float(p) * 3)}", root / rel) for rel, p, kind in rows]


def ten_classes(dest: Path, per_class: int, seed: int) -> Path:
    from skimage.data import lfw_subset

    rng, by_label = random.Random(seed), {}
    for label, src in _elpv():
        by_label.setdefault(label, []).append(src)
    faces = lfw_subset()
    by_label |= {"face": list(range(100)), "non_face": list(range(100, 200))}
    for label, items in sorted(by_label.items()):
        (dest / label).mkdir(parents=True)
        for i, item in enumerate(rng.sample(items, per_class)):
            if isinstance(item, int):
                pixels = (faces[item] * 255).round().astype(np.uint8)
                Image.fromarray(pixels).save(dest / label / f"{i:03d}.png")
            else:
                (dest / label / f"{i:03d}.png").write_bytes(item.read_bytes())
    assert len(by_label) == 10
    return dest


def random_labels(dest: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    for i, (_, src) in enumerate(rng.sample(_elpv(), n)):
        label = rng.choice(["a", "b"])
        (dest / label).mkdir(parents=True, exist_ok=True)
        (dest / label / f"{i:03d}.png").write_bytes(src.read_bytes())
    return dest


@pytest.fixture(scope="module")
def shared_engines(tmp_path_factory):
    """Lite0's graphs exported once for the module, as the user's cache keeps them across projects."""
    before = os.environ.get("HEADSTART_CACHE")
    os.environ["HEADSTART_CACHE"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    os.environ["HEADSTART_CACHE"] = before if before is not None else "project"


def _run(root: Path, data: Path, seed: int):
    from flows.training import training

    params = write_params(
        root / "params.yaml",
        [
            f"project.artifacts_dir={root / 'artifacts'}",
            f"project.cache_dir={root / 'cache'}",
            f"project.seed={seed}",
            f"prepare.data_dir={data}",
            f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            f"mlflow.artifact_location={root / 'mlruns'}",
            "register.model_name=few",
            "export.fp16=false",
        ],
    )
    return training(params_file=str(params), return_state=True)


@pytest.mark.parametrize("per_class,seed", [(12, 0), (12, 1), (20, 0)])
def test_ten_classes_of_a_few_real_images_register_a_champion(
    tmp_path, prefect_harness, shared_engines, per_class, seed
):
    import pandas as pd

    data = ten_classes(tmp_path / "data", per_class, seed)
    state = _run(tmp_path, data, seed)
    assert state.is_completed(), state.message
    r = state.result()
    assert r["register"]["model_version"] == "1" and r["promote"]["promoted"]
    clean = pd.read_parquet(tmp_path / "artifacts" / "validate" / "manifest.parquet")
    assert len(clean) == 10 * per_class  # nothing refused, nothing left out
    assert all(set(g) == {"train", "val", "test"} for _, g in clean.groupby("label")["split"])
    ev = r["evaluate"]
    assert ev["n_test"] < 100 and ev["estimate"] == "held_out"  # the larger held-out sample decides
    assert ev["estimates"]["held_out"]["n"] > ev["n_test"] and "beats" in ev["signal"]


def test_random_labels_end_with_no_signal_and_register_nothing(tmp_path, prefect_harness, shared_engines):
    import mlflow

    from tasks.evaluate import NoSignal

    state = _run(tmp_path, random_labels(tmp_path / "data", 80, 0), 0)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, NoSignal) and str(exc).startswith("no signal: ") and "\n" not in str(exc)
    art = tmp_path / "artifacts"
    assert not (art / "export" / "model.onnx").exists() and not (art / "register").exists()
    failed = art / "evaluate" / "failed" / "metrics.json"  # the gate's report, for inspection
    assert '"passed": false' in failed.read_text()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("headstart").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("no signal: ")
    assert client.search_model_versions("name='few'") == []
    page = (art / "report" / "index.html").read_text(encoding="utf-8")
    assert "Failed at stage evaluate" in page and "No signal: " in page
