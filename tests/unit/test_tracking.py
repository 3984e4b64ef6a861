"""tracking: errors classified by MLflow's error code, one pipeline run reused across stages, curves
logged while training runs, and a register that, failed once and retried, leaves one version."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from headstart import HeadstartError, TransientError
from headstart.config import load_params
from headstart.tracking import (
    classify,
    curve_logger,
    finish_run,
    log_failed_run,
    log_pipeline_run,
    pipeline_run,
    run_file,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating its tables takes seconds); each test has its own
    experiment and model name in it."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def cfg(tmp_path, store, request):
    return load_params(
        None,
        [
            f"project.artifacts_dir={tmp_path / 'artifacts'}",
            f"project.cache_dir={tmp_path / 'cache'}",
            f"mlflow.tracking_uri=sqlite:///{store / 'mlflow.db'}",
            f"mlflow.artifact_location={store / 'mlruns'}",
            f"mlflow.experiment={request.node.name}",
            f"register.model_name={request.node.name[-40:]}",
        ],
    )


def _client(cfg):
    import mlflow

    return mlflow.MlflowClient(cfg.mlflow.tracking_uri, registry_uri=cfg.mlflow.tracking_uri)


def _onnx(path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "tiny", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _register(cfg, tmp_path):
    report = tmp_path / "report.json"
    report.write_text("{}")
    return log_pipeline_run(
        cfg, {"test_accuracy": 0.9}, {"evaluate": report}, _onnx(tmp_path / "m.onnx"), {"t": "1"}, []
    )


def test_errors_are_classified_by_error_code_not_message():
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        INTERNAL_ERROR,
        INVALID_PARAMETER_VALUE,
        RESOURCE_DOES_NOT_EXIST,
        TEMPORARILY_UNAVAILABLE,
    )

    def kind(exc):
        return type(classify(exc, "x", "http://h"))

    assert kind(MlflowException("model not found, try later", TEMPORARILY_UNAVAILABLE)) is TransientError
    assert kind(MlflowException("API request failed: connection refused", INTERNAL_ERROR)) is TransientError
    assert kind(MlflowException("bad", RESOURCE_DOES_NOT_EXIST)) is HeadstartError
    assert kind(MlflowException("server unavailable", INVALID_PARAMETER_VALUE)) is HeadstartError
    assert kind(requests.exceptions.ConnectionError("refused")) is TransientError
    bug = ValueError("a bug")
    assert classify(bug, "x", "http://h") is bug  # not MLflow's: kept as it is, with its traceback


def test_the_pipeline_run_is_reused_until_finished(cfg):
    first = pipeline_run(cfg, tags={"a": "1"})
    assert pipeline_run(cfg) == first  # a later stage, another process: same run, from the file
    assert json.loads(run_file(cfg).read_text())["run_id"] == first
    assert _client(cfg).get_run(first).info.status == "RUNNING"
    finish_run(cfg, first)
    second = pipeline_run(cfg)  # the next pipeline execution
    assert second != first and _client(cfg).get_run(first).info.status == "FINISHED"
    third = pipeline_run(cfg, fresh=True)  # a new flow run abandons one left RUNNING
    assert third != second and _client(cfg).get_run(second).info.status == "KILLED"
    _client(cfg).delete_run(third)
    assert pipeline_run(cfg) not in (first, second, third)


def test_changed_params_open_a_new_run(cfg):
    first = pipeline_run(cfg)
    changed = cfg.model_copy(update={"project": cfg.project.model_copy(update={"seed": 7})})
    assert pipeline_run(changed) != first
    assert _client(cfg).get_run(first).info.status == "KILLED"


def test_curves_reach_the_run_while_training_and_its_clock_started_before(cfg):
    from headstart.training import fit_head

    started = time.time() - 60  # the flow's start, a minute before training
    run_id = pipeline_run(cfg, fresh=True, started=started)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 8)).astype(np.float32), np.arange(20) % 2
    p = cfg.train_head.model_copy(update={"max_epochs": 5, "patience": 10, "hidden": 4})
    seen = []

    def probe(row):
        logger(row)
        seen.append(len(_client(cfg).get_metric_history(run_id, "curve.val_loss")))

    logger = curve_logger(cfg, "train_head")
    _, history, _ = fit_head(x, y, x, y, 2, p, 0, on_epoch=probe)
    assert seen == [1, 2, 3, 4, 5]  # each epoch in MLflow as it ended, not at register
    points = _client(cfg).get_metric_history(run_id, "curve.val_loss")
    assert [m.step for m in points] == [1, 2, 3, 4, 5]
    assert points[-1].value == pytest.approx(history[-1]["val_loss"])
    run = _client(cfg).get_run(run_id)
    assert run.info.start_time == int(started * 1000) < min(m.timestamp for m in points)


def test_a_tracking_outage_never_stops_training(cfg, monkeypatch, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    logger = curve_logger(cfg, "finetune", offset=3)
    for epoch in (1, 2):
        logger({"epoch": epoch, "val_loss": 1.0})
    assert sum("curves not sent" in r.getMessage() for r in caplog.records) == 1


def test_register_failed_once_after_the_version_was_made_and_retried_leaves_one_version(
    cfg, tmp_path, monkeypatch
):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    real = mlflow.MlflowClient.create_model_version
    calls = []

    def dies_after(self, *args, **kwargs):
        version = real(self, *args, **kwargs)
        calls.append(version.version)
        if len(calls) == 1:  # the server went down before it answered
            raise MlflowException("gateway timeout", TEMPORARILY_UNAVAILABLE)
        return version

    monkeypatch.setattr(mlflow.MlflowClient, "create_model_version", dies_after)
    with pytest.raises(TransientError, match="unreachable or failing"):
        _register(cfg, tmp_path)
    ids = _register(cfg, tmp_path)  # the flow's retry
    versions = _client(cfg).search_model_versions(f"name='{cfg.register.model_name}'")
    assert [str(v.version) for v in versions] == ["1"] and calls == [1]
    assert ids["model_version"] == "1" and versions[0].run_id == ids["run_id"]
    model = _client(cfg).get_logged_model(versions[0].source.removeprefix("models:/"))
    assert model.experiment_id == ids["experiment_id"]  # beside its run, not in the default experiment


def test_a_server_down_mid_register_leaves_no_half_version(cfg, tmp_path, monkeypatch):
    import mlflow
    import requests

    real = mlflow.MlflowClient.create_model_version
    monkeypatch.setattr(
        mlflow.MlflowClient,
        "create_model_version",
        lambda self, *a, **k: (_ for _ in ()).throw(requests.exceptions.ConnectionError("refused")),
    )
    with pytest.raises(TransientError):
        _register(cfg, tmp_path)  # the model's files were uploaded; the version never made
    assert _client(cfg).search_model_versions(f"name='{cfg.register.model_name}'") == []
    monkeypatch.setattr(mlflow.MlflowClient, "create_model_version", real)
    ids = _register(cfg, tmp_path)
    versions = _client(cfg).search_model_versions(f"name='{cfg.register.model_name}'")
    assert [str(v.version) for v in versions] == ["1"]
    from headstart.tracking import downloaded_model

    with downloaded_model(ids["model_uri"], cfg) as path:
        assert path.name == "model.onnx" and path.stat().st_size > 0


def test_a_failure_marks_the_pipeline_run_failed_not_another(cfg, tmp_path):
    run_id = pipeline_run(cfg)
    report = tmp_path / "validate"
    report.mkdir()
    (report / "report.json").write_text("{}")
    assert log_failed_run(cfg, "validate", "bad data", {"validate": report}, {"x": "y"}) == run_id
    run = _client(cfg).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["failed_stage"] == "validate"
    assert len(_client(cfg).search_runs([run.info.experiment_id])) == 1


# any folder name the file system allows is a class: non-Latin scripts, punctuation MLflow rejects in
# a key, emoji, a name that is nothing but punctuation, undecodable bytes (a lone surrogate), 240 chars
AWKWARD = [
    "猫",
    "кошка",
    "cats & dogs",
    "cats, dogs",
    "coffee (hot)",
    "50%+",
    "😀",
    "..",
    "x\udcff",
    "a" * 240,
]


def _valid_key(key: str) -> bool:
    from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name

    return bool(validate_param_and_metric_name(key)) and not path_not_unique(key) and len(key) <= 250


def test_class_keys_are_valid_unique_and_readable():
    from headstart.tracking import class_keys

    keys = class_keys("test_recall", AWKWARD)
    assert all(_valid_key(k) for k in keys), keys
    assert len(set(keys)) == len(AWKWARD)  # `cats & dogs` and `cats, dogs` read alike: the index parts them
    assert keys[:6] == [
        "test_recall.0_猫",
        "test_recall.1_кошка",
        "test_recall.2_cats_dogs",
        "test_recall.3_cats_dogs",
        "test_recall.4_coffee_hot",
        "test_recall.5_50",
    ]
    assert keys[6] == "test_recall.6" and keys[7] == "test_recall.7" and len(keys[9]) < 100


def test_awkward_class_names_register_and_travel_as_data(cfg, tmp_path):
    """The run's metrics have safe keys; the exact names come back from classes.json and the tag."""
    from headstart.tracking import class_keys, classes_record

    keys = class_keys("test_recall", AWKWARD)
    report = tmp_path / "report.json"
    report.write_text("{}")
    ids = log_pipeline_run(
        cfg,
        {**dict.fromkeys(keys, 0.5), "test_accuracy": 0.9},
        {"evaluate": report},
        _onnx(tmp_path / "m.onnx"),
        {"classes": json.dumps(AWKWARD, ensure_ascii=False), "error": "x\udcff"},
        [],
        classes=AWKWARD,
    )
    client = _client(cfg)
    run = client.get_run(ids["run_id"])
    assert set(keys) <= set(run.data.metrics) and all(_valid_key(k) for k in run.data.metrics)
    local = client.download_artifacts(ids["run_id"], "classes.json", str(tmp_path))
    record = json.loads(Path(local).read_text(encoding="utf-8"))
    assert [c["name"] for c in record] == AWKWARD and record == classes_record(AWKWARD)
    assert json.loads(run.data.tags["classes"]) == AWKWARD


def test_user_chosen_param_keys_are_made_safe_and_stay_distinct(tmp_path, store):
    cfg = load_params(
        None,
        [
            f"project.artifacts_dir={tmp_path / 'artifacts'}",
            f"mlflow.tracking_uri=sqlite:///{store / 'mlflow.db'}",
            f"mlflow.artifact_location={store / 'mlruns'}",
            "mlflow.experiment=user_keys",
            "schedule.timeout_s={'train head (slow)!': 60, 'train_head_slow': 70, '😀': 80}",
        ],
    )
    params = _client(cfg).get_run(pipeline_run(cfg)).data.params
    timeouts = {k: v for k, v in params.items() if k.startswith("schedule.timeout_s")}
    assert sorted(timeouts.values()) == ["60.0", "70.0", "80.0"], timeouts
    assert all(_valid_key(k) for k in params)


def test_a_register_that_mlflow_refuses_is_recorded_with_its_stage(cfg, tmp_path):
    """A failure inside register (here MLflow refusing a metric key) still leaves the run FAILED with
    failed_stage=register and the error, as the flow's _record asks."""
    run_id = pipeline_run(cfg)
    report = tmp_path / "report.json"
    report.write_text("{}")
    with pytest.raises(HeadstartError) as err:
        log_pipeline_run(cfg, {"test_recall.cats & dogs": 1.0}, {}, _onnx(tmp_path / "m.onnx"), {}, [])
    assert (
        log_failed_run(cfg, "register", str(err.value), {"evaluate": report}, {"classes": "😀 x\udcff"})
        == run_id
    )
    run = _client(cfg).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["failed_stage"] == "register"
    assert "cats & dogs" in run.data.tags["error"]


@pytest.mark.parametrize(
    "garbage",
    [b'{"run_id": "0123', b"\xff\xfe\x00garbage", b"[1, 2]", b"null", b'{"run_id": 5, "tracking_uri": 7}'],
    ids=["truncated", "binary", "a list", "null", "wrong types"],
)
def test_a_damaged_run_file_opens_a_new_run_with_a_warning(cfg, garbage, caplog):
    path = run_file(cfg)
    path.parent.mkdir(parents=True)
    path.write_bytes(garbage)
    with caplog.at_level("WARNING", logger="headstart.tracking"):
        run_id = pipeline_run(cfg)
    assert f"{path} is damaged" in caplog.text and "a new MLflow run is opened" in caplog.text
    assert json.loads(path.read_text())["run_id"] == run_id
    assert _client(cfg).get_run(run_id).info.status == "RUNNING"
    assert pipeline_run(cfg) == run_id  # the rewritten record is trusted again


def test_a_version_registered_before_the_pyfunc_layout_still_downloads(cfg, tmp_path):
    """Versions logged as mlflow.onnx models (model.onnx, extra_files/) stay servable and comparable:
    a champion from before is read where it is."""
    import mlflow
    import mlflow.onnx
    import onnx

    from headstart.tracking import _using, downloaded_model

    uri, name = cfg.mlflow.tracking_uri, cfg.register.model_name
    fp16 = _onnx(tmp_path / "model_fp16.onnx")
    with _using(uri), mlflow.start_run(experiment_id=mlflow.create_experiment(name)) as run:
        info = mlflow.onnx.log_model(
            onnx.load(_onnx(tmp_path / "m.onnx")), name="model", extra_files=[str(fp16)]
        )
    client = _client(cfg)
    client.create_registered_model(name)
    with _using(uri):
        client.create_model_version(name, info.model_uri, run_id=run.info.run_id, model_id=info.model_id)
    with downloaded_model(f"models:/{name}/1", cfg) as path:
        assert path.name == "model.onnx" and path.parent.name != "artifacts"
    with downloaded_model(f"models:/{name}/1", cfg, "fp16") as path:
        assert path.parent.name == "extra_files" and path.read_bytes() == fp16.read_bytes()


def test_a_registered_version_is_the_serving_pyfunc_with_plain_onnx_files(cfg, tmp_path):
    import mlflow

    from headstart import serving
    from headstart.tracking import downloaded_model

    onnx_file = _onnx(tmp_path / "m.onnx")
    ids = log_pipeline_run(cfg, {}, {}, onnx_file, {}, [], serving={"max_images": 7})
    with _using_store(cfg):
        flavors = mlflow.models.get_model_info(ids["model_uri"]).flavors
    assert set(flavors) == {"python_function"} and set(flavors["python_function"]["artifacts"]) == {"fp32"}
    assert flavors["python_function"]["config"] == {**serving.DEFAULTS, "max_images": 7}
    with downloaded_model(ids["model_uri"], cfg) as path:
        assert path.relative_to(path.parents[1]).as_posix() == "artifacts/model.onnx"
        assert path.read_bytes() == onnx_file.read_bytes()  # the file as exported
    with pytest.raises(HeadstartError, match=r"no artifacts/model_fp16.onnx .*export.fp16=false"):
        with downloaded_model(ids["model_uri"], cfg, "fp16"):
            pass


def _using_store(cfg):
    from headstart.tracking import _using

    return _using(cfg.mlflow.tracking_uri)


def test_an_experiment_and_model_another_run_created_meanwhile_are_used(cfg, tmp_path, monkeypatch):
    """Two projects' runs on one tracking server: between this run's lookup and its create, the other
    run creates the experiment and the registered model; this run then uses them, not fails."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    other, first = _client(cfg), {"experiment", "model"}
    real_experiment, real_model = (
        mlflow.MlflowClient.get_experiment_by_name,
        mlflow.MlflowClient.get_registered_model,
    )

    def experiment_late(self, name):
        if "experiment" in first:  # looked up as missing, then the other run creates it
            first.discard("experiment")
            other.create_experiment(name)
            return None
        return real_experiment(self, name)

    def model_late(self, name):
        if "model" in first:
            first.discard("model")
            other.create_registered_model(name)
            raise MlflowException(f"{name} not found", RESOURCE_DOES_NOT_EXIST)
        return real_model(self, name)

    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name", experiment_late)
    monkeypatch.setattr(mlflow.MlflowClient, "get_registered_model", model_late)
    ids = _register(cfg, tmp_path)
    assert not first and ids["model_version"] == "1"
    assert ids["experiment_id"] == real_experiment(other, cfg.mlflow.experiment).experiment_id


def test_a_version_carries_its_pinned_requirements_without_scanning_the_environment(
    cfg, tmp_path, monkeypatch
):
    """The version's requirements are pinned from this environment, so MLflow's check of them against
    it (which first maps every installed distribution's files: seconds) is skipped; the pins are
    still what the version records."""
    import mlflow
    from mlflow.utils import requirements_utils

    from headstart.provenance import serving_requirements
    from headstart.tracking import downloaded_model

    scans = []  # MLflow catches what its check raises: the calls are counted instead
    monkeypatch.setattr(requirements_utils, "_init_packages_to_modules_map", lambda: scans.append(1))
    ids = log_pipeline_run(cfg, {}, {}, _onnx(tmp_path / "m.onnx"), {}, serving_requirements())
    assert scans == []
    with downloaded_model(ids["model_uri"], cfg) as path:
        written = (path.parents[1] / "requirements.txt").read_text().split()
    assert set(serving_requirements()) <= set(written)
    assert any(line.startswith(f"mlflow=={mlflow.__version__}") for line in written)
