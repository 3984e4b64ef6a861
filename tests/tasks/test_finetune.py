"""The finetune stage on the tiny backbone: the gate, frozen-stays-frozen, rejection, kill-and-resume,
and the reproducibility of head training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import headstart.finetune as ft
import headstart.training as tr
from headstart import HeadstartError
from headstart.config import load_params
from headstart.training import load_model
from tasks.calibrate import calibrate
from tasks.domain import domain
from tasks.evaluate import evaluate
from tasks.finetune import finetune
from tasks.prepare import prepare
from tasks.scratch import scratch
from tasks.select import select
from tasks.train_head import train_head
from tasks.validate import validate
from tests.conftest import make_folder, tiny_overrides

FAST = ["finetune.max_epochs=4", "finetune.patience=4", "finetune.batch_size=8", "finetune.lr=0.01"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_weights):
    """prepare -> validate -> domain -> train_head once; each test runs finetune with its params."""
    root = tmp_path_factory.mktemp("finetune")
    data = make_folder(root / "data", per_class=14, classes=("cat", "dog"))
    overrides = tiny_overrides(root, data, tiny_weights)
    cfg = load_params(None, overrides)
    for stage in (prepare, validate, domain, train_head):
        stage(cfg)
    n_train = json.loads((cfg.stage_dir("train_head") / "metrics.json").read_text())["n_train"]
    return overrides, n_train


def _cfg(base, *extra):
    overrides, _ = base
    return load_params(None, overrides + FAST + list(extra))


def _decision(cfg) -> dict:
    return json.loads((cfg.stage_dir("finetune") / "decision.json").read_text())


def test_the_gate_opens_at_the_threshold_and_not_below(base):
    _, n_train = base
    closed = _cfg(base, f"finetune.min_train_images={n_train + 1}", "finetune.margin=0")
    result = finetune(closed)
    d = _decision(closed)
    assert not result.finetuned and not d["gate_open"] and "min_train_images" in d["reason"]
    assert d["gate"]["n_train"] == n_train
    head_only = closed.stage_dir("train_head") / "model.pt"
    assert (closed.stage_dir("finetune") / "model.pt").read_bytes() == head_only.read_bytes()
    assert "not used" in (closed.stage_dir("finetune") / "summary.md").read_text()

    opened = _cfg(base, f"finetune.min_train_images={n_train}", "finetune.margin=0")
    finetune(opened)
    d = _decision(opened)
    assert d["gate_open"] and d["epochs_run"] >= 1 and d["unfrozen"] and d["trainable_parameters"] > 0


def test_the_domain_verdict_can_be_required(base):
    cfg = _cfg(base, "finetune.min_train_images=0", "finetune.require_shifted=true")
    finetune(cfg)
    d = _decision(cfg)
    verdict = d["gate"]["domain_verdict"]
    assert d["gate_open"] == (verdict == "shifted") and (verdict == "shifted" or "shifted" in d["reason"])


def test_frozen_tensors_and_batchnorm_stay_bit_identical(base, monkeypatch):
    """Every tensor outside the unfrozen blocks, and every BatchNorm buffer, unchanged; BN in eval."""
    seen_training = []
    original = ft.fit

    def spy(split, *args, **kwargs):
        bns = ft.bn_modules(split.tail)
        for m in bns:
            m.register_forward_pre_hook(lambda mod, _a: seen_training.append(mod.training))
        return original(split, *args, **kwargs)

    monkeypatch.setattr("headstart.finetune.fit", spy)
    # the tiny head is already perfect on validation: a weak baseline makes the fine-tune the keeper
    real_score, calls = ft.score, []

    def weak_baseline(*args, **kwargs):  # the first score is the head alone's, before any epoch
        calls.append(1)
        return (9.9, 0.0) if len(calls) == 1 else real_score(*args, **kwargs)

    monkeypatch.setattr("headstart.finetune.score", weak_baseline)
    # 7 test images, all right, 5 of them one class: too few to show a signal (p = 0.09); the gate has
    # its own tests, this one is about the fine-tuned backbone's features reaching evaluate
    cfg = _cfg(
        base,
        "finetune.min_train_images=0",
        "finetune.margin=0",
        "finetune.unfreeze=2",
        "evaluate.signal_confidence=0",
    )
    finetune(cfg)
    d = _decision(cfg)
    assert d["finetuned"] and d["frozen_check"]["unchanged"] and d["frozen_check"]["tensors"] > 0
    assert seen_training and not any(seen_training)  # BN ran in eval mode in every training step
    # the saved model: the pretrained tensors everywhere except the unfrozen blocks' weights
    tuned = load_model(cfg.stage_dir("finetune") / "model.pt")
    pretrained = load_model(cfg.stage_dir("train_head") / "model.pt")
    a, b = tuned.backbone.model.state_dict(), pretrained.backbone.model.state_dict()
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert moved and not [k for k in moved if k in tr.frozen_tensors(tuned.backbone.model, moved)]
    assert not [k for k in moved if "bn" in k or "running" in k]
    assert tuned.finetuned and tuned.backbone.cache_key != pretrained.backbone.cache_key
    scratch(cfg), select(cfg), calibrate(cfg)
    assert evaluate(cfg).n_test > 0  # features of the fine-tuned backbone, under their own cache key


def test_frozen_check_catches_a_changed_tensor():
    layer = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    before = tr.tensor_hashes(tr.frozen_tensors(layer, []))
    with torch.no_grad():
        layer[1].running_mean[0] += 1e-7
    assert tr.changed(before, tr.tensor_hashes(tr.frozen_tensors(layer, []))) == ["1.running_mean"]


def test_a_worse_fine_tune_is_rejected_and_the_head_kept(base):
    cfg = _cfg(base, "finetune.min_train_images=0", "finetune.margin=1.0")  # nothing clears +100%
    result = finetune(cfg)
    d = _decision(cfg)
    assert d["gate_open"] and not result.finetuned and "does not clear finetune.margin" in d["reason"]
    assert (cfg.stage_dir("finetune") / "model.pt").read_bytes() == (
        cfg.stage_dir("train_head") / "model.pt"
    ).read_bytes()
    scratch(cfg), select(cfg), calibrate(cfg)
    assert evaluate(cfg).n_test > 0  # evaluate serves the head-only model from finetune/model.pt


def test_kill_and_resume_ends_like_an_uninterrupted_run(base, monkeypatch):
    args = ("finetune.min_train_images=0", "finetune.margin=0", "finetune.patience=10")
    whole = _cfg(base, *args)
    finetune(whole)
    expected = _decision(whole)
    expected_model = (whole.stage_dir("finetune") / "model.pt").read_bytes()
    expected_history = json.loads((whole.stage_dir("finetune") / "history.json").read_text())

    def killed(epoch):
        if epoch == 2:
            raise KeyboardInterrupt("killed after epoch 2")

    monkeypatch.setattr(ft, "_after_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune(whole)
    assert list((whole.project.cache_dir / "finetune").rglob("checkpoint.pt"))  # left for the restart
    monkeypatch.setattr(ft, "_after_epoch", lambda epoch: None)
    finetune(whole)
    resumed = _decision(whole)
    assert resumed["resumed_from_epoch"] == 2 and expected["resumed_from_epoch"] == 0
    history = json.loads((whole.stage_dir("finetune") / "history.json").read_text())
    assert history == expected_history
    for key in ("finetuned", "val_accuracy_finetuned", "val_loss_finetuned", "best_epoch", "frozen_check"):
        assert resumed[key] == expected[key], key
    assert (whole.stage_dir("finetune") / "model.pt").read_bytes() == expected_model
    assert not list((whole.project.cache_dir / "finetune").rglob("checkpoint.pt"))  # cleaned up


def _training_objects():
    split = ft.partition_backbone(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.Flatten()), 1, 4)
    model = torch.nn.Sequential(split.tail, torch.nn.Linear(32, 2))
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ft.lr_lambda(1, 4))
    return model, opt, sched, torch.amp.GradScaler("cuda", enabled=False), torch.Generator()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "other inputs", "other model"])
def test_a_damaged_checkpoint_is_discarded_with_a_warning_and_training_starts_afresh(
    tmp_path, damage, caplog
):
    """A checkpoint is a cache: a bad one is removed and fine-tuning restarts from epoch 1, with the
    training objects untouched, instead of an error asking the user to delete it."""
    model, opt, sched, scaler, gen = _training_objects()
    state = {"epoch": 3, "history": [], "best": 1.0, "best_epoch": 1, "waited": 0, "best_state": None}
    path = tmp_path / "checkpoint.pt"
    ft._save(path, "key-a", state, model, opt, sched, scaler, gen)
    assert ft._restore(path, "key-a", *_training_objects())["epoch"] == 3  # intact: resumed
    blob, key, target = path.read_bytes(), "key-a", _training_objects()
    if damage == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "other inputs":
        key = "key-b"
    else:
        target = (torch.nn.Sequential(torch.nn.Linear(32, 3)), *target[1:])
    before = {k: v.clone() for k, v in target[0].state_dict().items()}
    with caplog.at_level("WARNING", logger="headstart.finetune"):
        assert ft._restore(path, key, *target) is None
    assert "discarded, fine-tuning starts from epoch 1" in caplog.text and str(path) in caplog.text
    assert not path.exists()
    assert all(torch.equal(v, before[k]) for k, v in target[0].state_dict().items())


def test_a_truncated_checkpoint_restarts_to_the_uninterrupted_result(base, monkeypatch):
    args = ("finetune.min_train_images=0", "finetune.margin=0", "finetune.max_epochs=3")
    cfg = _cfg(base, *args)
    finetune(cfg)
    expected, model = _decision(cfg), (cfg.stage_dir("finetune") / "model.pt").read_bytes()

    def killed(epoch):
        if epoch == 2:
            raise KeyboardInterrupt("killed after epoch 2")

    monkeypatch.setattr(ft, "_after_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg)
    (checkpoint,) = (cfg.project.cache_dir / "finetune").rglob("checkpoint.pt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # a kill mid-write where rename is not atomic
    monkeypatch.setattr(ft, "_after_epoch", lambda epoch: None)
    finetune(cfg)
    assert _decision(cfg)["resumed_from_epoch"] == 0
    assert (cfg.stage_dir("finetune") / "model.pt").read_bytes() == model
    for key in ("finetuned", "val_accuracy_finetuned", "val_loss_finetuned", "best_epoch"):
        assert _decision(cfg)[key] == expected[key], key


def test_partition_backbone_computes_what_the_extractor_computes(tiny_weights):
    from headstart.backbones import load_backbone
    from tests.conftest import TINY_BACKBONE

    backbone = load_backbone(TINY_BACKBONE, *tiny_weights)
    extractor = backbone.feature_extractor()
    size = backbone.spec.size
    x = torch.randn(2, 3, size, size)
    for unfreeze in (1, 2, "all"):
        split = ft.partition_backbone(extractor, unfreeze, size)
        with torch.no_grad():
            assert torch.allclose(split.tail(split.prefix(x)), extractor(x), atol=1e-5)
        assert split.trainable and not any("bn" in n for n in split.trainable)
    assert (
        ft.partition_backbone(extractor, "all", size).unfrozen
        == ft.partition_backbone(extractor, 1, size).units
    )
    with pytest.raises(HeadstartError, match="units"):
        ft.partition_backbone(extractor, 99, size)


def test_warmup_then_cosine():
    f = ft.lr_lambda(4, 20)
    assert [round(f(s), 3) for s in (0, 3)] == [0.25, 1.0]
    assert f(4) == pytest.approx(1.0) and f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)


@pytest.mark.slow  # two pipelines from empty caches: determinism end to end, not the edit loop's
def test_same_seed_same_metrics(tmp_path, tiny_weights):
    """Two runs from scratch (own caches, own artifacts) with the same params give the same numbers."""
    data = make_folder(tmp_path / "data", per_class=10, classes=("cat", "dog"))
    runs = []
    for name in ("a", "b"):
        cfg = load_params(None, tiny_overrides(tmp_path / name, data, tiny_weights))
        for stage in (prepare, validate, domain, train_head):
            stage(cfg)
        m = json.loads((cfg.stage_dir("train_head") / "metrics.json").read_text())
        runs.append({k: v for k, v in m.items() if k not in ("extract_images_per_s", "wall_s")})  # timings
        runs[-1]["history"] = json.loads((cfg.stage_dir("train_head") / "history.json").read_text())
    assert runs[0] == runs[1]


def test_class_weights_and_balanced_sampling():
    from headstart.training import balanced_order, class_weights

    y = np.array([0] * 90 + [1] * 10)
    w = class_weights(y, 2)
    assert w[1] / w[0] == pytest.approx(9.0) and float((w[torch.tensor(y)]).mean()) == pytest.approx(1.0)
    order = balanced_order(torch.tensor(y), torch.Generator().manual_seed(0))
    share = float((torch.tensor(y)[order] == 1).float().mean())
    assert 0.35 < share < 0.65  # ~half the draws from the 10% class


def test_augmented_views_are_cached_once_and_deterministic(base):
    from headstart.features import view_seed
    from headstart.preprocess import load_view

    cfg = _cfg(base, "train_head.augment_views=2")
    first = train_head(cfg)
    m = json.loads((cfg.stage_dir("train_head") / "metrics.json").read_text())
    assert m["augment_views"] == 2 and first.features_computed == 2 * m["n_train"]  # originals cached
    again = train_head(cfg)
    assert again.features_computed == 0 and again.val_accuracy == first.val_accuracy
    path = next(cfg.prepare.data_dir.rglob("*.png"))
    from headstart.backbones import load_backbone

    spec = load_backbone(cfg.train_head.backbone, cfg.train_head.weights).spec
    a, b = load_view(path, spec, view_seed(0, "x", 0)), load_view(path, spec, view_seed(0, "x", 1))
    assert np.array_equal(a, load_view(path, spec, view_seed(0, "x", 0))) and not np.array_equal(a, b)
    train_head(_cfg(base))  # leave the module's head-only model as the other tests expect
