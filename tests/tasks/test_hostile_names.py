"""Hostile input (#14): any folder name the file system allows is a class that trains, exports and
registers (MLflow sees safe keys; the exact names travel as data: classes.json, the `classes` tag);
a damaged state file is a cache gone bad, rebuilt with a warning."""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import pytest

from flows.training import _unchanged  # imported first: Prefect sets up logging (caplog's handler after it)
from headstart.config import load_params
from headstart.provenance import run_fingerprint
from headstart.stages import NAMES as STAGE_NAMES
from headstart.stages import get
from tasks.register import register
from tests.conftest import make_image, tiny_overrides

pytestmark = pytest.mark.slow  # the pipeline to register on eight classes: not the edit loop's

NAMES = ("猫", "кошка", "cats & dogs", "cats, dogs", "coffee (hot)", "50%+", "😀", "b" * 240)


def test_awkward_class_names_train_export_and_register(tmp_path, tiny_weights):
    from mlflow import MlflowClient
    from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name

    data = tmp_path / "data"
    for c, name in enumerate(NAMES):  # one distinct hue per class, so the tiny backbone parts them
        colour = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(c / len(NAMES), 0.8, 0.8))
        for i in range(14):
            make_image(data / name / f"{i:03d}.png", colour, seed=1000 * c + i)
    cfg = load_params(None, [*tiny_overrides(tmp_path, data, tiny_weights), "train_head.max_epochs=10"])
    for name in STAGE_NAMES[: STAGE_NAMES.index("register")]:  # the pipeline up to register
        get(name).function(cfg)
    reg = register(cfg)

    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(reg.run_id)
    assert run.info.status == "FINISHED"
    keys = list(run.data.metrics) + list(run.data.params) + list(run.data.tags)
    bad = [k for k in keys if not validate_param_and_metric_name(k) or path_not_unique(k) or len(k) > 250]
    assert not bad
    record = json.loads(
        Path(client.download_artifacts(reg.run_id, "classes.json", str(tmp_path))).read_text()
    )
    classes = sorted(NAMES)  # train_head numbers the classes in sorted order
    assert [c["name"] for c in record] == classes and json.loads(run.data.tags["classes"]) == classes
    per_class = json.loads((cfg.stage_dir("evaluate") / "metrics.json").read_text())["per_class"]
    assert all(run.data.metrics[c["test_recall"]] == per_class[c["name"]]["recall"] for c in record)


@pytest.mark.parametrize(
    "garbage",
    [b'{"parts": {"data_hash": "ab', b"\xff\xfe\x00", b"[]", b'{"parts": "x"}', "no flow run id"],
    ids=["truncated", "binary", "a list", "parts not a dict", "fields missing"],
)
def test_a_damaged_last_success_record_means_retrain_with_a_warning(tmp_path, garbage, caplog):
    """The skip rule's state file is a cache: damaged, it means "no previous success" (retrain), never
    a crash of the scheduled run."""
    cfg = load_params(None, [f"project.artifacts_dir={tmp_path / 'artifacts'}"])
    (cfg.stage_dir("register") / "run.json").parent.mkdir(parents=True)
    (cfg.stage_dir("register") / "run.json").write_text("{}")
    state = tmp_path / "last_success.json"
    good = {"flow_run_id": "f", "finished_at": "t", "model_uri": "models:/m/1"}
    state.write_text(json.dumps({**good, "parts": run_fingerprint(cfg, "abc")["parts"]}))
    assert _unchanged(cfg, state, "abc")[0]  # an intact record of the same inputs: skipped
    if isinstance(garbage, bytes):
        state.write_bytes(garbage)
    else:
        state.write_text(json.dumps({"parts": run_fingerprint(cfg, "abc")["parts"]}))
    with caplog.at_level("WARNING", logger="flows.training"):
        skipped, changed = _unchanged(cfg, state, "abc")
    assert skipped is None and changed == [f"the record of the last success, {state}, is damaged"]
    assert f"{state} is damaged" in caplog.text
