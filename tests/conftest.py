"""Shared fixtures: tiny images made in tmp_path, a tiny timm backbone with weights in a local file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart.config import Params, load_params

TINY_BACKBONE = "test_efficientnet"  # timm's 0.36M-parameter test network, 160 px input

# one distinct colour per class, so that even a random backbone separates them
COLOURS = [(200, 40, 40), (40, 180, 60), (40, 60, 200), (200, 200, 40)]


def make_image(path: Path, colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (40, 32)):
    """A small RGB image: a class colour plus seeded noise (so every file has its own hash)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_folder(root: Path, per_class: int = 12, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            make_image(root / name / f"{name}_{i:03d}.png", COLOURS[c], seed=1000 * c + i)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> tuple[Path, str]:
    """Seeded random weights for the tiny backbone, saved as a plain state_dict file."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(TINY_BACKBONE, pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_overrides(root: Path, data: Path, weights: tuple[Path, str]) -> list[str]:
    """Params for a fast pipeline in `root`: tiny backbone, few epochs, MLflow in root."""
    return [
        f"project.artifacts_dir={root / 'artifacts'}",
        f"project.cache_dir={root / 'cache'}",
        f"prepare.data_dir={data}",
        f"train_head.backbone={TINY_BACKBONE}",
        f"train_head.weights={weights[0]}",
        f"train_head.weights_sha256={weights[1]}",
        "train_head.max_epochs=60",
        "train_head.patience=10",
        "train_head.lr=0.02",  # the random tiny backbone's features are ~1e-3 in scale
        "train_head.hidden=32",
        # the stage tests pin the head's settings above; the search has its own tests (test_search.py,
        # tests/tasks/test_stages.py's searched train_head)
        "train_head.search.trials=0",
        "export.opset=18",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        f"mlflow.artifact_location={root / 'mlruns'}",
        "register.model_name=tiny",
        "domain.on_mismatch=warn",  # coloured noise through a random backbone is no photo
        "domain.max_images=16",
        "promote.allowed_verdicts=[in_domain, shifted, mismatch]",  # the random tiny backbone: mismatch
    ]


@pytest.fixture
def tiny_params(tmp_path, image_folder, tiny_weights) -> Params:
    return load_params(None, tiny_overrides(tmp_path, image_folder, tiny_weights))


@pytest.fixture(autouse=True)
def _no_ambient_mlflow(monkeypatch):
    """A developer's MLFLOW_TRACKING_URI never receives test runs, and no test leaks one to the next."""
    import os
    import sys

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(autouse=True)
def _packaged_weights_need_the_marker(request, monkeypatch):
    """Only tests marked `pretrained` load the packaged ImageNet weights: an unmarked one fails here,
    naming the marker, instead of quietly slowing the fast lane (`make test-fast`) down."""
    if request.node.get_closest_marker("pretrained"):
        return
    import headstart.backbones as backbones

    real = backbones._builtin

    def guarded(name, weights, sha):
        if weights is None:
            raise AssertionError(
                f"this test loads the packaged {name} weights: mark it pytest.mark.pretrained"
            )
        return real(name, weights, sha)

    monkeypatch.setattr(backbones, "_builtin", guarded)


def pytest_configure(config):
    """torch on one intra-op thread in the tests and the processes they start (the same arithmetic on
    both sides of a comparison): the tensors are tiny, and where cores are shared a second thread
    waiting for a busy core made fit_head 3-20x slower (2 cores). An explicit OMP_NUM_THREADS wins.
    Exported engines stay in each test's own project cache (HEADSTART_CACHE=project), never in the
    developer's shared one: tests that damage a cached graph on purpose cannot reach another test;
    the shared cache's own tests point HEADSTART_CACHE at a folder of theirs."""
    import os

    os.environ["HEADSTART_CACHE"] = "project"

    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """GPU tests run where a CUDA device exists and are reported as skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_params(path: Path, overrides: list[str]) -> Path:
    """A complete params.yaml at `path`: the defaults with `overrides` applied (for flows, CLIs, DVC)."""
    import yaml

    path.write_text(yaml.safe_dump(load_params(None, overrides).model_dump(mode="json"), sort_keys=False))
    return path


def visible_head_model(tiny_weights, classes: list[str]):
    """A tiny backbone with a random head scaled up: its features are tiny, so the logits differ
    visibly between images (what parity and graft tests compare)."""
    import torch

    from headstart.backbones import load_backbone
    from headstart.training import TrainedModel, make_head

    backbone = load_backbone(TINY_BACKBONE, weights=tiny_weights[0], weights_sha256=tiny_weights[1])
    torch.manual_seed(0)
    head = make_head(backbone.num_features, len(classes), 16, 0.2)
    with torch.no_grad():
        head[0].weight.mul_(100.0)
    return TrainedModel(head.eval(), backbone, classes)


def tiny_backbone(tiny_weights):
    """The tiny test backbone with the session's tiny weights."""
    from headstart.backbones import load_backbone

    return load_backbone(TINY_BACKBONE, weights=tiny_weights[0], weights_sha256=tiny_weights[1])


def scanned_images(tmp_path: Path, per_class: int) -> tuple[list[Path], list[str]]:
    """A made class folder's images and their content hashes, as prepare's scan finds them."""
    from headstart.data.manifest import scan

    root = make_folder(tmp_path / "data", per_class=per_class)
    m = scan(root, [".png"], tmp_path / "scan_cache")
    return [root / p for p in m["path"]], list(m["sha256"])
