"""The backbone stage: a named backbone is recorded as fixed; `auto` ranks the candidates on a bounded
sample, records every score and its choice, skips a candidate it cannot load, falls back to the default,
and the later stages use what it chose."""

from __future__ import annotations

import hashlib
import json

import pytest

from headstart import HeadstartError
from headstart.config import BackboneParams, Candidate, load_params
from headstart.ranking import ranking_sample
from tasks import _backbone
from tasks.backbone import backbone
from tasks.domain import domain
from tasks.prepare import prepare
from tasks.validate import validate
from tests.conftest import TINY_BACKBONE, make_folder, tiny_overrides

SECOND = "test_resnet"  # a second tiny timm network, with seeded weights in a local file


@pytest.fixture(scope="module")
def second_weights(tmp_path_factory):
    import timm
    import torch

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights2") / "second.pth"
    torch.save(timm.create_model(SECOND, pretrained=False).state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def validated(tmp_path_factory, tiny_weights):
    root = tmp_path_factory.mktemp("backbone")
    data = make_folder(root / "data", per_class=12, classes=("cat", "dog", "owl"))
    cfg = load_params(None, tiny_overrides(root, data, tiny_weights))
    prepare(cfg)
    validate(cfg)
    return cfg


def _own(cfg, tmp_path):
    """cfg with its own copy of the artifacts and its own (empty) feature cache."""
    import shutil

    shutil.copytree(cfg.project.artifacts_dir, tmp_path / "artifacts")
    project = {"artifacts_dir": tmp_path / "artifacts", "cache_dir": tmp_path / "cache"}
    return cfg.model_copy(update={"project": cfg.project.model_copy(update=project)})


def _auto(cfg, tmp_path, candidates: list[Candidate], max_images: int = 24):
    """train_head.backbone auto over `candidates`, with its own artifacts and feature cache."""
    # torch: each fresh cache would export every candidate to ONNX again, the slow part here
    update = {"backbone": "auto", "weights": None, "weights_sha256": None, "runtime": "torch"}
    th = cfg.train_head.model_copy(update=update)
    choice = BackboneParams(candidates=candidates, max_images=max_images)
    return _own(cfg, tmp_path).model_copy(update={"train_head": th, "backbone": choice})


def _decision(cfg) -> dict:
    return json.loads((cfg.stage_dir("backbone") / "decision.json").read_text())


def _tiny(weights) -> Candidate:
    return Candidate(name=TINY_BACKBONE, weights=weights[0], weights_sha256=weights[1])


def _second(weights) -> Candidate:
    return Candidate(name=SECOND, weights=weights[0], weights_sha256=weights[1])


def test_a_named_backbone_is_recorded_as_fixed_and_nothing_is_extracted(validated, tmp_path):
    cfg = _own(validated, tmp_path)
    result = backbone(cfg)
    d = _decision(cfg)
    assert (result.chosen, result.how) == (TINY_BACKBONE, "fixed")
    assert d["reason"] == "fixed by train_head.backbone" and d["candidates"] == []
    assert d["backbone"]["weights"] == str(cfg.train_head.weights)
    assert not (tmp_path / "cache" / "features").exists()  # not one image through any backbone
    assert result.line == f"{TINY_BACKBONE} (train_head.backbone)"
    assert (cfg.stage_dir("backbone") / "summary.md").read_text().startswith(f"# Backbone: {TINY_BACKBONE}")


def test_auto_ranks_every_candidate_and_later_stages_use_the_choice(
    validated, tmp_path, tiny_weights, second_weights
):
    cfg = _auto(validated, tmp_path, [_tiny(tiny_weights), _second(second_weights)])
    result = backbone(cfg)
    d = _decision(cfg)
    assert [c["name"] for c in d["candidates"]] == [TINY_BACKBONE, SECOND]
    for c in d["candidates"]:
        assert isinstance(c["logme"], float) and c["n_images"] == d["n_images"] == 24
        assert c["features_computed"] == 24 and c["extract_s"] >= 0 and c["num_features"] > 0
    for c in d["candidates"]:  # 28 train+val images: small data, each scored by 5-fold CV too
        assert 0 <= c["cv_accuracy"] <= 1 and len(c["cv_fold_accuracies"]) == 5 and c["cv_accuracy_std"] >= 0
    assert d["how"] == "cv_accuracy" and d["chosen"] == result.chosen
    assert d["folds"].startswith("5-fold cross-validation over 24")
    assert d["chosen"] in (TINY_BACKBONE, SECOND) and d["wall_s"] > 0
    assert d["backbone"]["weights"] == str(
        dict(tiny=tiny_weights, second=second_weights)["tiny" if d["chosen"] == TINY_BACKBONE else "second"][
            0
        ]
    )
    assert result.line.startswith(f"{d['chosen']} (auto: ") and "ranking took" in result.line
    assert _backbone.chosen(cfg).name == d["chosen"]
    assert (
        domain(cfg)
        and json.loads((cfg.stage_dir("domain") / "report.json").read_text())["backbone"] == (d["chosen"])
    )
    again = _auto(validated, tmp_path / "again", [_tiny(tiny_weights), _second(second_weights)])
    backbone(again)
    keep = ("name", "logme", "cv_accuracy", "cv_accuracy_std", "fold_accuracies", "n_images")
    same = [{k: c.get(k) for k in keep} for c in _decision(again)["candidates"]]
    assert same == [{k: c.get(k) for k in keep} for c in d["candidates"]]
    assert (_decision(again)["chosen"], _decision(again)["reason"]) == (d["chosen"], d["reason"])
    backbone(cfg)  # the same cache: every feature is read, none computed
    assert [c["features_computed"] for c in _decision(cfg)["candidates"]] == [0, 0]


def test_a_candidate_without_weights_is_skipped_and_the_run_goes_on(validated, tmp_path, tiny_weights):
    missing = Candidate(name=SECOND, weights=tmp_path / "nowhere.pth")
    cfg = _auto(validated, tmp_path, [missing, _tiny(tiny_weights)])
    result = backbone(cfg)
    d = _decision(cfg)
    skipped = d["candidates"][0]
    assert skipped["name"] == SECOND and "nowhere.pth does not exist" in skipped["skipped"]
    assert "logme" not in skipped
    assert (result.chosen, d["how"]) == (TINY_BACKBONE, "cv_accuracy")  # the one left, by its score
    assert f"skipped {SECOND}" in result.line
    assert "skipped: " in (cfg.stage_dir("backbone") / "summary.md").read_text()


def test_larger_data_ranks_by_logme_alone(validated, tmp_path, tiny_weights, second_weights):
    cfg = _auto(validated, tmp_path, [_tiny(tiny_weights), _second(second_weights)])
    search = cfg.train_head.search.model_copy(update={"cv_max_images": 20})  # 28 train+val images
    cfg = cfg.model_copy(update={"train_head": cfg.train_head.model_copy(update={"search": search})})
    result = backbone(cfg)
    d = _decision(cfg)
    assert d["how"] == "logme" and "cv_max_images" in d["folds"]
    assert all(c["cv_accuracy"] is None for c in d["candidates"])
    best = max(d["candidates"], key=lambda c: c["logme"])["name"]
    assert result.chosen == best and result.line.startswith(f"{best} (auto: LogME ")


def test_no_loadable_candidate_falls_back_to_the_default(validated, tmp_path):
    wrong = Candidate(name=TINY_BACKBONE, weights=tmp_path / "a.pth", weights_sha256="0" * 64)
    (tmp_path / "a.pth").write_bytes(b"not weights")
    cfg = _auto(
        validated, tmp_path, [wrong, Candidate(name="efficientnet_lite1", weights=tmp_path / "b.pth")]
    )
    result = backbone(cfg)
    d = _decision(cfg)
    assert (result.chosen, d["how"]) == ("efficientnet_lite0", "fallback")
    assert d["backbone"] == {"name": "efficientnet_lite0", "weights": None, "weights_sha256": None}
    assert (
        "sha256" in d["candidates"][0]["skipped"] and "b.pth does not exist" in d["candidates"][1]["skipped"]
    )
    assert "no candidate could be ranked" in d["reason"] and "b.pth" in d["reason"]


def test_auto_without_its_decision_names_the_stage(validated, tmp_path, tiny_weights):
    cfg = _auto(validated, tmp_path, [_tiny(tiny_weights)])
    with pytest.raises(HeadstartError, match="run the backbone stage first"):
        _backbone.chosen(cfg)
    assert _backbone.name(cfg) == "auto"  # what a failed run's MLflow tag says
    backbone(_own(validated, tmp_path / "named").model_copy(update={"project": cfg.project}))
    with pytest.raises(HeadstartError, match="records a fixed backbone.*run the backbone stage again"):
        _backbone.chosen(cfg)


def test_the_sample_is_bounded_stratified_and_train_first(validated):
    from tasks import _inputs

    frame = _inputs.manifest(validated)
    pool = frame[frame["split"].isin(["train", "val"])]
    rows = ranking_sample(pool, 12)
    share = pool["label"].value_counts() * 12 / len(pool)  # 28 images: 7 cats, 11 dogs, 10 owls here
    assert len(rows) == 12 and (abs(rows["label"].value_counts() - share) < 1).all()
    first_val = list(rows["split"]).index("val")
    assert set(rows["split"][:first_val]) == {"train"} and set(rows["split"][first_val:]) == {"val"}
    assert ranking_sample(pool.sample(frac=1, random_state=3), 12).equals(rows)  # order-free
    assert len(ranking_sample(pool, 10_000)) == len(pool)


@pytest.mark.pretrained
def test_real_backbones_are_ranked_and_the_decision_names_one(tmp_path):
    """efficientnet_lite0 and lite1 with their packaged ImageNet weights, on 20 images."""
    data = make_folder(tmp_path / "data", per_class=10, classes=("cat", "dog"))
    cfg = load_params(
        None,
        [
            f"project.artifacts_dir={tmp_path / 'artifacts'}",
            f"project.cache_dir={tmp_path / 'cache'}",
            f"prepare.data_dir={data}",
            "train_head.backbone=auto",
            "train_head.runtime=torch",  # two ONNX exports would dominate; the ranking is the point
            "backbone.candidates=[efficientnet_lite0, efficientnet_lite1]",
        ],
    )
    prepare(cfg)
    validate(cfg)
    result = backbone(cfg)
    d = _decision(cfg)
    scores = {c["name"]: c["logme"] for c in d["candidates"]}
    assert set(scores) == {"efficientnet_lite0", "efficientnet_lite1"}
    assert all(isinstance(v, float) and abs(v) < 1e3 for v in scores.values())
    assert {c["num_features"] for c in d["candidates"]} == {1280}
    assert d["how"] in ("logme", "cv_accuracy") and result.chosen == d["chosen"] in scores
    if d["how"] == "logme":
        assert d["chosen"] == max(scores, key=scores.get)
    assert result.line.startswith(f"{d['chosen']} (auto: ")
