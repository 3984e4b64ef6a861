"""The training flow under Prefect and the same pipeline under `dvc repro`, on tiny data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_folder, make_image, tiny_overrides, write_params

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, tiny_weights, prefect_harness):
    from flows.training import training

    root = tmp_path_factory.mktemp("flow")
    data = make_folder(root / "data", per_class=12)
    # the fine-tuning gate forced open, so the flow carries both training phases end to end
    overrides = [
        *tiny_overrides(root, data, tiny_weights),
        "finetune.min_train_images=0",
        "finetune.max_epochs=2",
    ]
    params = write_params(root / "params.yaml", overrides)
    return root, params, training(params_file=str(params))


def test_flow_runs_every_stage_and_tags_the_mlflow_run(flow_run):
    import mlflow

    root, _, result = flow_run
    assert set(result) >= {"prepare", "train_head", "evaluate", "export", "register"}
    assert result["export"]["top1_agreement"] == 1.0
    run = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(result["register"]["run_id"])
    assert run.data.tags["prefect.flow_run_id"] not in ("", "None")
    assert run.data.metrics["test_accuracy"] == pytest.approx(result["evaluate"]["accuracy"])
    decision = json.loads((root / "artifacts" / "finetune" / "decision.json").read_text())
    assert decision["gate_open"] and run.data.tags["finetune.finetuned"] == str(decision["finetuned"]).lower()
    assert run.data.tags["finetune.reason"] == decision["reason"]
    head = json.loads((root / "artifacts" / "train_head" / "history.json").read_text())
    steps = [
        m.step
        for m in mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_metric_history(
            run.info.run_id, "curve.val_loss"
        )
    ]
    assert sorted(steps) == list(range(1, len(head) + decision["epochs_run"] + 1))  # one axis, both phases
    prepared = (root / "artifacts" / "prepare" / "report.json").stat().st_mtime * 1000
    assert run.info.start_time < prepared < run.info.end_time  # the run's duration is the pipeline's
    assert result["report"]["path"] == str(root / "artifacts" / "report" / "index.html")  # the run report,
    logged = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").list_artifacts(run.info.run_id, "report")
    assert "report/index.html" in {a.path for a in logged}  # logged to the run after it finished


@pytest.mark.browser
def test_the_flow_report_opened_offline_in_chromium_shows_every_section(flow_run, tmp_path):
    """A real run's report as a person sees it: every section's heading, every thumbnail loaded, and
    no request leaving the machine (Data Docs linked, not loaded)."""
    from headstart.browser import render
    from headstart.report import SECTIONS

    root, _, _ = flow_run
    r = render(root / "artifacts" / "report" / "index.html", tmp_path / "shot.png", query="section[id] > h2")
    assert r.external == [] and r.failed == [] and r.page_errors == []
    assert len(r.matches) == len(SECTIONS) and "not run" not in "".join(r.matches)
    assert len(r.images) >= 4 and r.broken_images == []  # examples per class, curves, confusion matrix


def test_flow_again_reuses_cached_features_and_registers_a_new_version(flow_run):
    from flows.training import training

    _, params, first = flow_run
    second = training(params_file=str(params), force=True)  # unforced, unchanged stages are reused
    assert second["train_head"]["features_computed"] == 0
    assert int(second["register"]["model_version"]) == int(first["register"]["model_version"]) + 1
    assert second["evaluate"] == first["evaluate"]  # same data, same params, same seed


def _failing_run(flow_run, folder: str, override: str):
    """The flow on the flow test's data with its own artifacts folder and one override; its state."""
    from flows.training import training

    root, params, _ = flow_run
    art = root / folder
    state = training(
        params_file=str(params), return_state=True, overrides=[f"project.artifacts_dir={art}", override]
    )
    assert state.is_failed()
    return root, art, state


def test_flow_stops_before_register_when_the_parity_gate_fails(flow_run, caplog):
    from headstart import HeadstartError

    _, art, state = _failing_run(flow_run, "failing", "export.tolerances.fp32.max_abs_diff=1e-30")
    assert isinstance(state.result(raise_on_failure=False), HeadstartError)
    assert not (art / "register").exists()
    assert json.loads((art / "export" / "failed" / "parity.json").read_text())["passed"] is False
    assert not (art / "export" / "model.onnx").exists()  # a refused model is never where predict looks
    assert "parity failed" in caplog.text  # the failure is logged...
    assert "Traceback" not in caplog.text  # ...as a message, not a crash


def test_failed_validation_marks_an_mlflow_run_failed_with_the_report(flow_run):
    import mlflow
    from prefect.client.orchestration import get_client

    from headstart.validation import ValidationFailed

    root, art, state = _failing_run(flow_run, "invalid", "validate.min_per_class=1000")
    assert isinstance(state.result(raise_on_failure=False), ValidationFailed)
    assert not (art / "train_head").exists()  # stopped before training
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("headstart").experiment_id],
        filter_string="tags.failed_stage = 'validate'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "min_per_class_per_split" in runs[0].data.tags["error"]
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id, "validate/failed")}
    assert "validate/failed/report.json" in logged  # the refused data's report, beside no manifest
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts()
    assert any(a.key == "data-validation" and "FAILED" in (a.data or "") for a in artifacts)
    failure = [a for a in artifacts if a.key == "failure" and "`validate`" in (a.data or "")]
    # the Prefect artifact names the MLflow run (other tests in the session fail at validate too)
    assert any(runs[0].info.run_id in a.data for a in failure)
    page = (art / "report" / "index.html").read_text(encoding="utf-8")  # the run report, headed by why
    assert '<section id="failure"><h2>Failed at stage validate' in page and "min_per_class_per_split" in page
    assert "report/index.html" in {a.path for a in client.list_artifacts(runs[0].info.run_id, "report")}
    assert any(a.key == "run-report" and str(art / "report") in (a.data or "") for a in artifacts)
    # a completed run tells its story in Prefect artifacts
    assert {"domain-check", "test-metrics", "export-parity", "mlflow-run", "promotion"} <= {
        a.key for a in artifacts
    }


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [Path(sys.executable).parent / "dvc", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True
    )


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory, tiny_weights, flow_run):
    """A copy of the project with the flow test's data and params, as a git + DVC repository."""
    proj = tmp_path_factory.mktemp("dvcproj")
    for name in ("headstart", "tasks", "flows"):
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", proj)
    (proj / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", proj / ".dvc")
    shutil.copy(ROOT / ".dvc" / ".gitignore", proj / ".dvc")
    flow_root = flow_run[0]
    shutil.copytree(flow_root / "data", proj / "data" / "raw")
    overrides = tiny_overrides(Path("."), Path("data/raw"), tiny_weights)
    overrides = [o.replace("sqlite:///./", "sqlite:///") for o in overrides]
    write_params(proj / "params.yaml", overrides)
    _git(proj, "init", "-q")
    _git(proj, "add", "-A")
    _git(proj, "commit", "-qm", "init")
    first = _dvc(proj, "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    return proj, first


def test_dvc_repro_produces_the_flows_artifacts(dvc_project, flow_run):
    proj, _ = dvc_project
    flow_root = flow_run[0]
    for stage, name in (
        ("evaluate", "metrics.json"),
        ("evaluate", "confusion.json"),
        ("prepare", "report.json"),
    ):
        ours = json.loads((proj / "artifacts" / stage / name).read_text())
        theirs = json.loads((flow_root / "artifacts" / stage / name).read_text())
        if stage == "prepare":  # the data folder's path differs, nothing else
            ours.pop("data_dir"), theirs.pop("data_dir")
        assert ours == theirs, f"{stage}/{name} differs between dvc repro and the Prefect flow"
    assert (proj / "artifacts" / "export" / "model.onnx").exists()
    assert json.loads((proj / "artifacts" / "register" / "run.json").read_text())["model_version"] == "1"


def test_second_dvc_repro_does_no_work(dvc_project):
    proj, _ = dvc_project
    again = _dvc(proj, "repro")
    assert again.returncode == 0, again.stderr
    assert "Running stage" not in again.stdout
    assert "up to date" in again.stdout


def test_dvc_metrics_show_and_params_diff(dvc_project):
    proj, _ = dvc_project
    shown = _dvc(proj, "metrics", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    assert "accuracy" in shown.stdout and "top1_agreement" in shown.stdout
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train_head"]["hidden"] = 16
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    diff = _dvc(proj, "params", "diff")
    assert diff.returncode == 0, diff.stderr
    assert "train_head.hidden" in diff.stdout and "16" in diff.stdout
    status = _dvc(proj, "status")
    assert "train_head" in status.stdout and "prepare" not in status.stdout.split("train_head")[0]


def test_dvc_repro_after_adding_an_image_reruns_from_prepare(dvc_project):
    proj, _ = dvc_project
    make_image(proj / "data" / "raw" / "cat" / "new.png", (200, 40, 40), seed=999)
    status = _dvc(proj, "status")
    assert "prepare" in status.stdout


def test_domain_mismatch_with_fail_stops_the_flow_before_training(flow_run):
    import mlflow

    from tasks.domain import DomainMismatch

    root, art, state = _failing_run(flow_run, "foreign", "domain.on_mismatch=fail")
    assert json.loads((art / "domain" / "failed" / "report.json").read_text())["verdict"] == "mismatch"
    assert isinstance(state.result(raise_on_failure=False), DomainMismatch)
    assert not (art / "train_head").exists()
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("headstart").experiment_id],
        filter_string="tags.failed_stage = 'domain'",
    )
    assert len(runs) == 1 and "choose another backbone" in runs[0].data.tags["error"]
