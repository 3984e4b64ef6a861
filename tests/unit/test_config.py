"""headstart.config: defaults, params.yaml, overrides and the errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from headstart import HeadstartError
from headstart.config import Params, flatten, load_params

REPO_PARAMS = Path(__file__).parents[2] / "params.yaml"


def test_defaults_load_without_a_file():
    params = load_params(None)
    assert params == Params()
    assert params.train_head.backbone == "efficientnet_lite0"
    assert params.prepare.val_fraction == pytest.approx(0.15)
    assert params.stage_dir("prepare") == Path("artifacts") / "prepare"


def test_repo_params_yaml_loads():
    assert REPO_PARAMS.is_file()
    params = load_params(REPO_PARAMS)
    assert params.train_head.lr == pytest.approx(1e-3)
    assert params.export.opset >= 17
    assert params.project.seed == 0
    assert ".png" in params.prepare.extensions


def test_override_parses_float():
    params = load_params(None, ["train_head.lr=0.01"])
    assert isinstance(params.train_head.lr, float)
    assert params.train_head.lr == pytest.approx(0.01)


def test_override_scientific_notation_and_null():
    params = load_params(None, ["train_head.lr=1e-2", "train_head.weights="])
    assert params.train_head.lr == pytest.approx(0.01)
    assert params.train_head.weights is None


def test_override_wins_over_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train_head:\n  hidden: 64\n")
    params = load_params(f, ["train_head.hidden=8"])
    assert params.train_head.hidden == 8
    assert load_params(f).train_head.hidden == 64


def test_unknown_section_raises():
    with pytest.raises(HeadstartError, match="trian_head"):
        load_params(None, ["trian_head.lr=0.1"])


def test_unknown_key_raises_with_key_name():
    with pytest.raises(HeadstartError, match=r"train_head\.lrr") as exc:
        load_params(None, ["train_head.lrr=1"])
    assert "unknown key" in str(exc.value)


def test_unknown_key_in_file_raises_with_key_name(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("prepare:\n  data_dri: x\n")
    with pytest.raises(HeadstartError, match=r"prepare\.data_dri"):
        load_params(f)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train_head.hidden=-1", "train_head.hidden"),
        ("prepare.test_fraction=abc", "prepare.test_fraction"),
        ("train_head.dropout=1.5", "train_head.dropout"),
        ("export.opset=12", "export.opset"),
        ("server.prefect_database_url=postgresql://db/prefect", "server.prefect_database_url"),
        (
            "server.mlflow_backend_store_uri=postgresql+psycopg2://u:pw@db/mlflow",
            "server.mlflow_backend_store_uri",
        ),
        ("server.mlflow_backend_store_uri=http://host:5000", "server.mlflow_backend_store_uri"),
        ("server.mlflow_backend_store_uri=postgresql://db/mlflow", "server.mlflow_backend_store_uri"),
    ],
)
def test_bad_value_raises_with_key_name(override, key):
    with pytest.raises(HeadstartError) as exc:
        load_params(None, [override])
    assert key in str(exc.value)


@pytest.mark.parametrize("override", ["train_head.lr", "train_head", "lr=0.1", ".lr=0.1", "train_head..lr=1"])
def test_malformed_override_raises(override):
    with pytest.raises(HeadstartError, match="section.key=value"):
        load_params(None, [override])


@pytest.mark.parametrize("override", ["a.b.c=1", "trian_head.lr=0.1"])
def test_override_of_unknown_section_raises(override):
    with pytest.raises(HeadstartError, match="unknown section") as exc:
        load_params(None, [override])
    assert override.split(".")[0] in str(exc.value)


def test_nested_override():
    params = load_params(None, ["validate.levels.enough_classes=warn", "validate.min_per_split.train=2"])
    assert params.validate.levels.enough_classes == "warn"
    assert params.validate.min_per_split.train == 2
    assert params.validate.min_per_split.test == 1  # siblings keep their defaults
    assert params.validate.levels.min_per_class_per_split == "fail"


def test_nested_override_merges_with_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("validate:\n  levels:\n    width_in_bounds: fail\n")
    params = load_params(f, ["validate.levels.enough_classes=warn"])
    assert params.validate.levels.width_in_bounds == "fail"
    assert params.validate.levels.enough_classes == "warn"


def test_nested_override_typo_names_the_key():
    with pytest.raises(HeadstartError, match=r"validate\.levels\.enough_clases") as exc:
        load_params(None, ["validate.levels.enough_clases=warn"])
    assert "unknown key" in str(exc.value)


def test_nested_override_bad_level_names_the_key():
    with pytest.raises(HeadstartError, match=r"validate\.levels\.enough_classes"):
        load_params(None, ["validate.levels.enough_classes=maybe"])


def test_override_below_a_scalar_raises(tmp_path):
    with pytest.raises(HeadstartError, match=r"train_head\.lr"):
        load_params(None, ["train_head.lr.x=1"])
    f = tmp_path / "p.yaml"
    f.write_text("train_head:\n  lr: 0.1\n")
    with pytest.raises(HeadstartError, match=r"'train_head\.lr' must be a mapping"):
        load_params(f, ["train_head.lr.x=1"])


def test_val_plus_test_fractions_too_large():
    with pytest.raises(HeadstartError, match="test_fraction"):
        load_params(None, ["prepare.val_fraction=0.5", "prepare.test_fraction=0.45"])
    # just below the limit is fine
    params = load_params(None, ["prepare.val_fraction=0.4", "prepare.test_fraction=0.45"])
    assert params.prepare.test_fraction == pytest.approx(0.45)


def test_missing_explicit_params_file_raises(tmp_path):
    with pytest.raises(HeadstartError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")


def test_invalid_yaml_raises(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train_head: [unclosed\n")
    with pytest.raises(HeadstartError, match="not valid YAML"):
        load_params(f)


def test_non_mapping_yaml_raises(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(HeadstartError, match="mapping"):
        load_params(f)


def test_params_are_frozen():
    params = load_params(None)
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on frozen models
        params.train_head.lr = 1.0


def test_flatten_gives_section_dot_key():
    flat = flatten(load_params(None, ["train_head.lr=0.01", "validate.levels.enough_classes=warn"]))
    assert flat["train_head.lr"] == "0.01"
    assert flat["project.seed"] == "0"
    assert flat["register.model_name"] == "headstart-demo"
    assert flat["validate.levels.enough_classes"] == "warn"
    assert flat["validate.min_per_split.train"] == "1" and flat["validate.min_per_class"] == "5"
    assert "validate.levels" not in flat and "validate.min_per_split" not in flat
    assert all(isinstance(v, str) for v in flat.values())
    sections = {k.split(".")[0] for k in flat}
    assert sections == set(Params.model_fields)

    def n_leaves(model) -> int:
        return sum(
            n_leaves(v) if isinstance(v, BaseModel) else 1
            for v in (getattr(model, f) for f in type(model).model_fields)
        )

    assert len(flat) == n_leaves(Params())


def test_the_old_per_split_form_of_min_per_class_names_its_new_place():
    with pytest.raises(HeadstartError, match="validate.min_per_split"):
        load_params(None, ["validate.min_per_class={train: 5, val: 1, test: 1}"])
