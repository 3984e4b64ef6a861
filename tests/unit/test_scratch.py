"""The from-scratch model: its size, its input spec from the data, its augmentation, and a training
loop that is seeded, resumable after a kill, and learns."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import headstart.checkpoint as ckpt
from headstart import HeadstartError
from headstart.checkpoint import EpochCheckpoint
from headstart.config import ScratchParams, load_params
from headstart.data.inspection import inspect_bytes
from headstart.finetune import Images
from headstart.scratch import (
    SIZES,
    augment,
    input_spec,
    parameter_count,
    pixels,
    resnet,
    train_scratch,
)

FAST = ScratchParams(max_epochs=4, patience=10, warmup_epochs=1, batch_size=16, lr=3e-3)


def _write(root: Path, arrays, labels) -> Images:
    paths, shas = [], []
    for i, (arr, label) in enumerate(zip(arrays, labels, strict=True)):
        path = root / label / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)
        paths.append(path)
        shas.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return Images(paths, shas, list(labels))


def _rows(images: Images) -> pd.DataFrame:
    return pd.DataFrame([inspect_bytes(p.read_bytes()) for p in images.paths])


def _colour_split(root: Path, n: int, seed: int) -> Images:
    """RGB images, 20x16, two classes told apart by colour."""
    rng = np.random.default_rng(seed)
    colours = {"red": (200, 40, 40), "blue": (40, 60, 200)}
    labels = [("red", "blue")[i % 2] for i in range(n)]
    arrays = [
        np.clip(np.array(colours[c]) + rng.normal(0, 30, (16, 20, 3)), 0, 255).astype(np.uint8)
        for c in labels
    ]
    return _write(root, arrays, labels)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    train, val = _colour_split(root / "train", 24, 0), _colour_split(root / "val", 8, 1)
    return train, val, input_spec(_rows(train))


def _train(colours, tmp_path: Path, key: str = "k", p: ScratchParams = FAST):
    train, val, spec = colours
    return train_scratch(train, val, spec, p, 0, "cpu", EpochCheckpoint(tmp_path / "ck.pt", key, "scratch"))


def test_parameter_count_is_a_few_hundred_thousand():
    rgb, grey = resnet(3, 10, 32), resnet(1, 10, 32)
    assert parameter_count(rgb) == 272_474  # the figure the module docstring and README state
    assert 200_000 < parameter_count(grey) == parameter_count(rgb) - 288 < 400_000
    assert parameter_count(resnet(3, 2, 32)) == 271_954


@pytest.mark.parametrize(("channels", "size"), [(1, 32), (3, 32), (1, 40), (3, 64), (3, 128)])
def test_grey_and_rgb_inputs_of_any_side(channels, size):
    model = resnet(channels, 3, size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, size, size)).shape == (2, 3)
    with pytest.raises(RuntimeError):  # the channel count is part of the model
        model(torch.randn(2, 4 - channels, size, size))


def _sized(sides: list[tuple[int, int]]) -> pd.DataFrame:
    stats = {f"{s}_{c}": 0.5 for s in ("mean", "std") for c in "rgb"}
    return pd.DataFrame([{"width": w, "height": h, **stats} for w, h in sides])


def test_size_auto_follows_the_data():
    assert input_spec(_sized([(8, 8)] * 5)).size == SIZES[0] == 32  # 8x8 digits: the lower bound
    assert input_spec(_sized([(40, 90), (48, 48), (300, 56), (64, 70), (200, 210)])).size == 56  # median
    assert input_spec(_sized([(61, 61), (60, 100), (200, 59)])).size == 64  # 60 -> a multiple of 8
    assert input_spec(_sized([(900, 700)] * 3)).size == SIZES[1] == 128
    assert input_spec(_sized([(900, 700)]), size=48).size == 48
    with pytest.raises(HeadstartError, match="no training images"):
        input_spec(_sized([]))


def test_normalisation_from_the_training_images(tmp_path):
    rng = np.random.default_rng(0)
    grey = [rng.integers(20, 120, (12, 12), dtype=np.uint8) for _ in range(6)]
    spec = input_spec(_rows(_write(tmp_path / "g", grey, ["a", "b"] * 3)))
    pooled = np.stack(grey).astype(np.float64) / 255  # same-size images: the pooled pixel statistics
    assert spec.channels == 1 and len(spec.mean) == len(spec.std) == 1
    assert spec.mean[0] == pytest.approx(pooled.mean(), abs=1e-4)
    assert spec.std[0] == pytest.approx(pooled.std(), abs=1e-4)

    rgb = [
        np.stack([rng.integers(0, 60, (12, 12)), rng.integers(100, 250, (12, 12)), grey[i]], 2)
        for i in range(6)
    ]
    rgb = [a.astype(np.uint8) for a in rgb]
    spec = input_spec(_rows(_write(tmp_path / "c", rgb, ["a", "b"] * 3)))
    pooled = np.stack(rgb).astype(np.float64) / 255
    assert spec.channels == 3 and spec.crop_pct == 1.0
    assert spec.mean == pytest.approx(tuple(pooled.mean((0, 1, 2))), abs=1e-4)
    assert spec.std == pytest.approx(tuple(pooled.std((0, 1, 2))), abs=1e-4)
    assert spec.mean[1] > 0.5 > spec.mean[0]  # per channel, not one number for all
    assert input_spec(_rows(_write(tmp_path / "c3", rgb, ["a", "b"] * 3)), channels=1).channels == 1


def test_a_grey_spec_round_trips_and_a_3_channel_one_keeps_its_json():
    spec = input_spec(_sized([(8, 8)] * 2), channels=1)
    assert type(spec).from_json(spec.to_json()) == spec and '"channels": 1' in spec.to_json()
    rgb = input_spec(_sized([(8, 8)] * 2), channels=3)
    assert "channels" not in rgb.to_json() and type(rgb).from_json(rgb.to_json()).channels == 3


def test_without_flip_no_view_is_mirrored():
    """A dark left half and a bright right half: a crop keeps dark on the left; only a mirror swaps them."""
    step = torch.zeros(200, 16, 16, 1, dtype=torch.uint8)
    step[:, :, 8:] = 255

    def mirrored(flip: bool) -> torch.Tensor:
        views = augment(step, torch.Generator().manual_seed(0), flip)[:, 0]
        return views[:, :, :8].mean((1, 2)) > views[:, :, 8:].mean((1, 2))

    assert not mirrored(False).any()
    assert 60 < int(mirrored(True).sum()) < 140  # the check can fail: flips do happen, half the time
    views = augment(step, torch.Generator().manual_seed(1), False)
    assert views.shape == (200, 1, 16, 16) and not torch.equal(views[0], views[1])  # crops differ


def test_same_seed_same_history_and_weights(colours, tmp_path):
    a, b = _train(colours, tmp_path / "a"), _train(colours, tmp_path / "b")
    assert a.history == b.history and len(a.history) == FAST.max_epochs
    assert a.best_epoch == b.best_epoch and a.resumed_from == 0
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not (tmp_path / "a" / "ck.pt").exists()  # removed once training is done


def test_kill_after_epoch_2_then_resume_ends_like_an_uninterrupted_run(colours, tmp_path, monkeypatch):
    whole = _train(colours, tmp_path / "whole")

    def killed(epoch):
        if epoch == 2:
            raise KeyboardInterrupt("killed after epoch 2")

    monkeypatch.setattr(ckpt, "_after_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(colours, tmp_path / "run")
    assert (tmp_path / "run" / "ck.pt").exists()
    monkeypatch.setattr(ckpt, "_after_epoch", lambda epoch: None)
    resumed = _train(colours, tmp_path / "run")
    assert resumed.resumed_from == 2 and resumed.history == whole.history
    sw, sr = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sw[k], sr[k]) for k in sw)


def test_a_checkpoint_of_other_inputs_restarts_from_epoch_1(colours, tmp_path, monkeypatch, caplog):
    def killed(epoch):
        raise KeyboardInterrupt(f"killed after epoch {epoch}")

    monkeypatch.setattr(ckpt, "_after_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(colours, tmp_path, key="old")
    monkeypatch.setattr(ckpt, "_after_epoch", lambda epoch: None)
    with caplog.at_level("WARNING"):
        result = _train(colours, tmp_path, key="new", p=FAST.model_copy(update={"max_epochs": 1}))
    assert result.resumed_from == 0 and "scratch starts from epoch 1" in caplog.text


def test_it_learns_8x8_digits(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.flatnonzero(digits.target < 3)
    arrays = [(digits.images[i] * (255 / 16)).astype(np.uint8) for i in keep]
    labels = [str(digits.target[i]) for i in keep]
    train = _write(tmp_path / "train", arrays[:150], labels[:150])
    val = _write(tmp_path / "val", arrays[150:240], labels[150:240])
    spec = input_spec(_rows(train))
    assert (spec.size, spec.channels) == (32, 1)
    assert pixels(train.paths[0], spec).shape == (32, 32, 1)
    p = ScratchParams(max_epochs=6, warmup_epochs=1, batch_size=32, lr=3e-3)
    result = train_scratch(train, val, spec, p, 0, "cpu", EpochCheckpoint(tmp_path / "ck.pt", "d"))
    best = result.history[result.best_epoch - 1]
    assert best["val_accuracy"] > 0.8, result.history  # chance is 1/3
    assert result.classes == ["0", "1", "2"] and result.parameters == parameter_count(result.model)


def test_scratch_params_are_bounded_like_the_others():
    p = load_params(None, ["scratch.size=64", "scratch.flip=true"]).scratch
    assert p.size == 64 and p.flip and load_params(None).scratch.size == "auto"
    for bad in ("scratch.size=4", "scratch.size=true", "scratch.size=big", "scratch.lr=.inf"):
        with pytest.raises(HeadstartError, match="scratch"):
            load_params(None, [bad])
    with pytest.raises(HeadstartError, match="scratch.run"):
        load_params(None, ["scratch.run=sometimes"])
