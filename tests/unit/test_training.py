"""headstart.training: the head's fit loop and the model file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headstart import HeadstartError
from headstart.backbones import load_backbone
from headstart.config import TrainHeadParams
from headstart.training import (
    Classifier,
    fit_head,
    fit_heads,
    load_model,
    make_head,
    save_model,
)
from tests.conftest import TINY_BACKBONE

EXTS = [".png"]


def _blobs(n_per_class: int, n_classes: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.5, (n_classes, dim))
    x = np.concatenate([c + rng.normal(0, 1.0, (n_per_class, dim)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(n_classes), n_per_class)
    return x, y


@pytest.fixture(scope="module")
def blobs():
    x, y = _blobs(30, 3, 16, seed=0)
    rng = np.random.default_rng(1)
    idx = rng.permutation(len(y))
    val, train = idx[:18], idx[18:]
    return x[train], y[train], x[val], y[val]


PARAMS = TrainHeadParams(hidden=16, lr=0.01, max_epochs=40, patience=5, batch_size=16)


def test_fit_head_separates_blobs(blobs):
    xt, yt, xv, yv = blobs
    head, history, best_epoch = fit_head(xt, yt, xv, yv, 3, PARAMS, seed=0)
    assert not head.training
    assert 1 <= len(history) <= PARAMS.max_epochs
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    assert set(history[0]) == {"epoch", "train_loss", "val_loss", "val_accuracy"}
    assert 1 <= best_epoch <= len(history)
    best = history[best_epoch - 1]
    # the best epoch is the lowest validation loss (fit_head ignores gains below 1e-6)
    assert best["val_loss"] <= min(h["val_loss"] for h in history) + 1e-6
    with torch.no_grad():
        pred = head(torch.from_numpy(xv)).argmax(1).numpy()
    assert (pred == yv).mean() >= 0.9
    assert best["val_accuracy"] >= 0.9
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_fit_head_returns_best_not_last(blobs):
    xt, yt, xv, yv = blobs
    head, history, best_epoch = fit_head(xt, yt, xv, yv, 3, PARAMS, seed=0)
    from headstart.training import class_weights

    loss = torch.nn.CrossEntropyLoss(weight=class_weights(yt, 3))  # class_balance: weighted (default)
    with torch.no_grad():
        val_loss = loss(head(torch.from_numpy(xv)), torch.from_numpy(yv).long()).item()
    assert val_loss == pytest.approx(history[best_epoch - 1]["val_loss"], rel=1e-5)


def test_fit_head_early_stops():
    # labels are noise: validation loss stops improving quickly, patience ends the run
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = rng.integers(0, 2, 60)
    p = TrainHeadParams(hidden=8, lr=0.05, max_epochs=300, patience=3, batch_size=16)
    _, history, best_epoch = fit_head(x[:40], y[:40], x[40:], y[40:], 2, p, seed=0)
    assert len(history) < 300
    assert len(history) - best_epoch == 3


def test_fit_head_without_val_uses_train(blobs):
    xt, yt, _, _ = blobs
    empty_x, empty_y = np.zeros((0, xt.shape[1]), np.float32), np.zeros(0, np.int64)
    _, history, _ = fit_head(xt, yt, empty_x, empty_y, 3, PARAMS, seed=0)
    assert history and np.isfinite(history[-1]["val_loss"])


def test_fit_head_deterministic(blobs):
    xt, yt, xv, yv = blobs
    a, hist_a, _ = fit_head(xt, yt, xv, yv, 3, PARAMS, seed=5)
    b, hist_b, _ = fit_head(xt, yt, xv, yv, 3, PARAMS, seed=5)
    assert hist_a == hist_b
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb)
    c, _, _ = fit_head(xt, yt, xv, yv, 3, PARAMS, seed=6)
    assert not torch.equal(a[0].weight, c[0].weight)


def test_make_head_shapes():
    head = make_head(256, 4, 32, 0.1)
    assert head(torch.zeros(5, 256)).shape == (5, 4)


# --- feature cache ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    return load_backbone(TINY_BACKBONE, weights=tiny_weights[0], weights_sha256=tiny_weights[1])


@pytest.fixture(scope="module")
def tiny_params(tiny_weights):
    return TrainHeadParams(
        backbone=TINY_BACKBONE, weights=tiny_weights[0], weights_sha256=tiny_weights[1], hidden=8
    )


def test_save_load_model_roundtrip(tmp_path, tiny, tiny_params):
    torch.manual_seed(0)
    head = make_head(tiny.num_features, 3, tiny_params.hidden, tiny_params.dropout).eval()
    classes = ["a", "b", "c"]
    path = tmp_path / "model" / "head.pt"
    save_model(path, tiny, head, classes, tiny_params)
    assert path.is_file()

    loaded = load_model(path)
    assert loaded.classes == classes
    assert loaded.backbone.name == TINY_BACKBONE
    assert loaded.backbone.weights_sha256 == tiny.weights_sha256
    assert loaded.backbone.spec == tiny.spec
    assert not loaded.classifier.training

    x = torch.randn(2, 3, tiny.spec.size, tiny.spec.size)
    original = Classifier(tiny.feature_extractor(), head).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.classifier(x), original(x), rtol=0, atol=0)


def test_load_model_missing_file(tmp_path):
    with pytest.raises(HeadstartError, match="does not exist"):
        load_model(tmp_path / "nope.pt")


def test_load_model_wrong_format(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "something/else"}, path)
    with pytest.raises(HeadstartError, match="not a headstart model"):
        load_model(path)


def test_load_model_detects_changed_backbone_weights(tmp_path, tiny_params, tiny):
    import shutil

    import timm

    weights = tmp_path / "w.pth"
    shutil.copy(tiny_params.weights, weights)
    p = tiny_params.model_copy(update={"weights": weights})
    head = make_head(tiny.num_features, 2, p.hidden, p.dropout)
    path = tmp_path / "head.pt"
    save_model(path, tiny, head, ["x", "y"], p)
    torch.manual_seed(123)
    torch.save(timm.create_model(TINY_BACKBONE).state_dict(), weights)
    with pytest.raises(HeadstartError, match="sha256"):
        load_model(path)


def test_fit_head_that_never_has_a_finite_loss_fails_clearly(blobs):
    xt, yt, xv, yv = blobs
    xt, xv = np.full_like(xt, np.nan), np.full_like(xv, np.nan)
    with pytest.raises(HeadstartError, match="diverged"):
        fit_head(xt, yt, xv, yv, 3, TrainHeadParams(max_epochs=3, patience=2), seed=0)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_load_model_on_a_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(HeadstartError, match="not a headstart model file"):
        load_model(path)


def _lazy_backbone(builds: list):
    """A backbone built on first use, like a built-in one; each build is seeded alike and recorded."""
    from headstart.backbones import Backbone, freeze
    from headstart.preprocess import InputSpec

    def build() -> torch.nn.Module:
        builds.append(1)
        torch.manual_seed(0)
        return freeze(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)))

    return Backbone("lazy", build, InputSpec(8, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0), 4, "ab" * 32)


def test_a_backbone_never_built_is_proven_frozen_without_building_it():
    """A warm train_head reads cached features only: the proof says nothing was loaded, builds nothing."""
    from headstart.training import proven_frozen_backbone

    builds = []
    backbone = _lazy_backbone(builds)
    with proven_frozen_backbone(backbone, "train_head") as proof:
        pass
    assert builds == [] and not backbone.built
    assert proof["loaded"] is False and proof["tensors"] == 0 and proof["unchanged"] is True
    assert proof["weights_sha256"] == "ab" * 32 and proof["compared_with"].startswith("nothing: never built")


def test_a_backbone_built_in_the_block_is_compared_with_a_fresh_build():
    from headstart.training import digest, frozen_tensors, proven_frozen_backbone, tensor_hashes

    builds = []
    backbone = _lazy_backbone(builds)
    with proven_frozen_backbone(backbone, "train_head") as proof:
        backbone.model(torch.zeros(1, 3, 2, 2))  # cold: features computed with the torch network
    assert len(builds) == 2 and proof["loaded"] is True and proof["unchanged"] is True
    assert proof["tensors"] == 7 and proof["compared_with"].startswith("a fresh build")
    assert proof["sha256"] == digest(tensor_hashes(frozen_tensors(backbone.model, [])))


def test_a_tensor_changed_in_a_backbone_built_in_the_block_refuses_the_result():
    from headstart.training import proven_frozen_backbone

    backbone = _lazy_backbone([])
    with pytest.raises(HeadstartError, match=r"train_head: 1 tensors .* changed .*1\.running_mean"):
        with proven_frozen_backbone(backbone, "train_head"):
            with torch.no_grad():
                backbone.model[1].running_mean[0] += 1e-7


def test_a_fine_tuned_backbone_built_in_the_block_cannot_be_proven_by_a_fresh_build():
    """fresh() builds the pretrained weights: a backbone with other tensors applied has no reference."""
    from headstart.training import proven_frozen_backbone

    backbone = _lazy_backbone([])
    with pytest.raises(HeadstartError, match="built here but cannot be rebuilt"):
        with proven_frozen_backbone(backbone, "train_head"):
            backbone.model.eval()  # built here, then fine-tuned tensors applied
            backbone.weights_sha256 = "cd" * 32


def test_a_backbone_built_before_the_block_is_hashed_before_and_after():
    from headstart.training import proven_frozen, proven_frozen_backbone

    builds = []
    backbone = _lazy_backbone(builds)
    with proven_frozen(backbone.model, [], "train_head") as plain:
        pass
    with proven_frozen_backbone(backbone, "train_head") as proof:
        pass
    assert len(builds) == 1 and proof.items() >= plain.items() and proof["loaded"] is True
    with pytest.raises(HeadstartError, match="1 tensors that must stay frozen changed"):
        with proven_frozen_backbone(backbone, "train_head"):
            with torch.no_grad():
                backbone.model[0].weight[0, 0] += 1e-7


def test_head_adamw_is_torch_adamw_bit_for_bit_without_importing_the_compiler():
    """fit_head's optimizer makes torch.optim.AdamW(foreach=True)'s update exactly, over steps with
    weight decay, and (in a fresh process) never imports torch._dynamo, which torch.optim's first
    step does."""
    import copy
    import subprocess
    import sys

    from headstart.training import HeadAdamW

    torch.manual_seed(0)
    ours = make_head(16, 3, 8, 0.0)
    theirs, start = copy.deepcopy(ours), copy.deepcopy(ours)
    a = HeadAdamW(ours.parameters(), lr=3e-3, weight_decay=1e-2)
    b = torch.optim.AdamW(theirs.parameters(), lr=3e-3, weight_decay=1e-2, foreach=True)
    x, y = torch.randn(32, 16), torch.randint(0, 3, (32,))
    for _ in range(7):
        for model, opt in ((ours, a), (theirs, b)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(ours[0].weight, start[0].weight)  # the steps moved the weights
    code = (
        "import sys, torch\n"
        "from headstart.training import HeadAdamW, make_head\n"
        "h = make_head(4, 2, 0, 0.0); o = HeadAdamW(h.parameters(), lr=0.1, weight_decay=0.0)\n"
        "h(torch.ones(2, 4)).sum().backward(); o.step()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _settings(**kw) -> TrainHeadParams:
    return TrainHeadParams().model_copy(update={"max_epochs": 40, "batch_size": 16, "lr": 3e-3, **kw})


@pytest.mark.parametrize(
    "kw", [{"hidden": 0, "dropout": 0.0}, {"hidden": 16, "dropout": 0.3, "class_balance": "sampler"}]
)
def test_heads_side_by_side_are_the_heads_trained_alone(kw):
    """fit_heads trains folds in threads, one per core: each head, its history and best epoch are
    bit for bit what fit_head gives alone (every random number from the fit's own generators), in
    the fits' order, whatever ran first; and neither touches torch's global generator."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((60, 12)).astype(np.float32), rng.integers(0, 3, 60)
    views = rng.standard_normal((45, 2, 12)).astype(np.float32)
    p = _settings(**kw)
    fits = [
        dict(
            x_train=x[: 45 - k],
            y_train=y[: 45 - k],
            x_val=x[45:],
            y_val=y[45:],
            seed=k,
            views=views[: 45 - k],
        )
        for k in range(4)
    ]
    state = torch.get_rng_state()
    together = fit_heads(fits, 3, p)
    assert torch.equal(torch.get_rng_state(), state)
    for f, (head, history, best) in zip(fits, together, strict=True):
        alone_head, alone_history, alone_best = fit_head(**f, num_classes=3, p=p, progress=False)
        assert history == alone_history and best == alone_best and len(history) > 1
        for name, tensor in alone_head.state_dict().items():
            assert torch.equal(head.state_dict()[name], tensor), name
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(together[0][0][-1].weight, together[1][0][-1].weight)  # seeds differ


def test_a_stop_from_on_done_runs_no_further_fit(monkeypatch):
    """What on_done raises (Optuna's pruning) reaches the caller, and the fits not yet started never run."""
    import headstart.training as training

    ran = []
    monkeypatch.setattr(training, "_cores", lambda: 1)
    real = training._fit_head
    monkeypatch.setattr(training, "_fit_head", lambda **kw: ran.append(kw["seed"]) or real(**kw))
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((30, 6)).astype(np.float32), rng.integers(0, 2, 30)
    fits = [dict(x_train=x[:20], y_train=y[:20], x_val=x[20:], y_val=y[20:], seed=k) for k in range(5)]

    def stop(i, _):
        if i == 1:
            raise KeyboardInterrupt("pruned")

    with pytest.raises(KeyboardInterrupt, match="pruned"):
        fit_heads(fits, 2, _settings(max_epochs=5), on_done=stop)
    assert ran[:2] == [0, 1] and len(ran) <= 3  # one worker: at most the fit queued behind it
