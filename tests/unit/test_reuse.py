"""headstart.reuse: a stage's recorded success is reused only while every input (params, files from
earlier stages, data, code, library versions) and every output is what it was; and register does not
register a model equal to the latest version unless forced."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from headstart import reuse
from headstart.config import load_params
from headstart.stages import get


@dataclass
class _Result:
    chosen: str
    score: float


@pytest.fixture
def cfg(tmp_path):
    return load_params(None, [f"project.artifacts_dir={tmp_path / 'artifacts'}"])


def _files(cfg, paths):
    for i, rel in enumerate(paths):
        path = cfg.project.artifacts_dir / rel
        if rel.endswith("model"):  # a folder out
            path.mkdir(parents=True, exist_ok=True)
            (path / "model.pt").write_bytes(b"weights")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"{rel} {i}".encode())


def _succeeded(cfg, stage, data_hash="d0"):
    _files(cfg, stage.deps)
    parts = reuse.inputs(cfg, stage, data_hash)
    _files(cfg, stage.outs)
    assert reuse.remember(cfg, stage, parts, _Result("transfer", 0.5), "run-1")
    return parts


def test_nothing_changed_is_reused_with_the_recorded_result(cfg):
    stage = get("select")
    _succeeded(cfg, stage)
    record, why = reuse.previous(cfg, stage, reuse.inputs(cfg, stage, "another data hash"))
    assert why == [] and record is not None  # select does not read the images: their hash is no input
    assert reuse.result(record).chosen == "transfer" and reuse.result(record).score == 0.5
    assert reuse.since(record).startswith("unchanged since flow run run-1")


def test_each_changed_input_or_output_reruns_the_stage(cfg, monkeypatch):
    stage = get("calibrate")  # reads the images, params, files of two earlier stages
    _succeeded(cfg, stage)

    def why(*overrides, data_hash="d0"):
        changed = load_params(None, [f"project.artifacts_dir={cfg.project.artifacts_dir}", *overrides])
        return reuse.previous(changed, stage, reuse.inputs(changed, stage, data_hash))[1]

    assert why() == []
    assert why("project.seed=7") == ["params: project.seed"]
    assert why("evaluate.batch_size=7") == []  # not a param calibrate declares
    assert why(data_hash="d1") == ["data"]
    (cfg.project.artifacts_dir / "select" / "model.pt").write_bytes(b"another model")
    assert why() == ["input select/model.pt"]
    _succeeded(cfg, stage)
    real_code = reuse.stage_code
    monkeypatch.setattr(reuse, "stage_code", lambda s: real_code(s) + ("-edited" if s is stage else ""))
    assert why() == ["code"]
    monkeypatch.undo()
    real_versions = reuse.library_versions
    monkeypatch.setattr(reuse, "library_versions", lambda: {**real_versions(), "onnx": "9.9"})
    assert why()[0].startswith("library onnx ") and why()[0].endswith("-> 9.9")
    monkeypatch.undo()
    (cfg.project.artifacts_dir / "calibrate" / "ood_gate.npz").write_bytes(b"edited by hand")
    assert why() == ["output calibrate/ood_gate.npz changed or missing"]
    (cfg.project.artifacts_dir / "calibrate" / "ood_gate.npz").unlink()
    assert why() == ["output calibrate/ood_gate.npz changed or missing"]


def test_a_damaged_or_missing_record_reruns_the_stage(cfg):
    stage = get("select")
    parts = _succeeded(cfg, stage)
    record = cfg.stage_dir("select") / reuse.RECORD
    record.write_text('{"parts": {"params"')
    assert reuse.previous(cfg, stage, parts) == (None, ["no record of an earlier success"])
    record.unlink()
    assert reuse.previous(cfg, stage, parts) == (None, ["no record of an earlier success"])


def test_a_result_that_is_not_plain_data_is_not_recorded(cfg):
    stage = get("select")
    _files(cfg, stage.deps)
    parts = reuse.inputs(cfg, stage, "d0")
    assert not reuse.remember(cfg, stage, parts, _Result(object(), 0.5), "run-1")
    assert not (cfg.stage_dir("select") / reuse.RECORD).exists()


def test_the_code_key_covers_the_stage_closure_and_its_package_data():
    names = {p.name for p in reuse.closure(get("domain"))}
    assert {"domain.py", "features.py", "__init__.py"} <= names
    assert reuse.stage_code(get("domain")) != reuse.stage_code(get("select"))


def test_an_identical_model_is_not_registered_again_unless_forced(tmp_path):
    from headstart.tracking import log_pipeline_run, pipeline_run
    from tests.unit.test_tracking import _onnx

    cfg = load_params(
        None,
        [
            f"project.artifacts_dir={tmp_path / 'artifacts'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"mlflow.artifact_location={tmp_path / 'mlruns'}",
            "register.model_name=same",
        ],
    )
    onnx_file = _onnx(tmp_path / "m.onnx")

    def register(serving=None, force=False):
        pipeline_run(cfg, fresh=True)  # each a new flow run
        return log_pipeline_run(cfg, {}, {}, onnx_file, {}, [], serving=serving, force=force)

    assert register()["model_version"] == "1"
    again = register()
    assert again["model_version"] == "1" and not again["registered"] and "same model as v1" in again["reason"]
    assert register(force=True)["model_version"] == "2"
    assert register(serving={"max_images": 7})["model_version"] == "3"  # served differently: registered
