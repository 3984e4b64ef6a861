"""The front door: --help stays light, bad input gives one clear line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from headstart.cli import main
from tests.conftest import make_folder


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "headstart.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_does_not_import_torch_or_prefect():
    code = (
        "import sys; from headstart.cli import _parser; _parser().format_help(); "
        "print(sorted(m for m in ('torch', 'prefect', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("layout", ["missing", "empty", "one_class", "only_text"])
def test_run_on_a_bad_data_folder_fails_in_one_line(tmp_path, layout):
    data = tmp_path / "data"
    if layout == "empty":
        data.mkdir()
    elif layout == "one_class":
        make_folder(data, per_class=3, classes=("cat",))
    elif layout == "only_text":
        (data / "cat").mkdir(parents=True)
        (data / "cat" / "notes.txt").write_text("hello")
    out = _run("run", "--data", str(data), "--set", f"project.artifacts_dir={tmp_path / 'art'}")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("headstart: error:") and str(data) in lines[0]
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "art").exists()


def test_bad_param_names_the_key(capsys):
    assert main(["params", "--set", "train_head.lrr=0.1"]) == 2
    assert "train_head.lrr: unknown key" in capsys.readouterr().err
    assert main(["params", "--set", "train_head.hidden=-3"]) == 2
    assert "train_head.hidden" in capsys.readouterr().err


def test_params_prints_resolved_overrides(capsys):
    assert main(["params", "--set", "train_head.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out


def test_missing_params_file_is_named(capsys, tmp_path):
    assert main(["params", "--params", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_data_pull_then_validate_exits_0_then_1(tmp_path, capsys):
    out = tmp_path / "lfw"
    assert main(["data", "pull", "lfw", "--out", str(out), "--per-class", "12"]) == 0
    assert "24 images" in capsys.readouterr().out
    (out / "face" / "broken.png").write_bytes(b"")
    sets = [
        "--set",
        f"project.artifacts_dir={tmp_path / 'art'}",
        "--set",
        f"project.cache_dir={tmp_path}/c",
        "--set",
        "validate.min_size=16",
    ]  # lfw crops are 25x25
    assert main(["validate", "--data", str(out), *sets]) == 0
    printed = capsys.readouterr()
    assert "quarantined" in printed.out and "broken.png: empty file" in printed.out
    assert "Data Docs:" in printed.out
    assert main(["validate", "--data", str(out), *sets, "--set", "validate.classes=[face, cat]"]) == 1
    assert "labels_as_declared" in capsys.readouterr().err
    assert main(["data", "pull", "lfw", "--out", str(out)]) == 2  # not empty any more
    assert "not empty" in capsys.readouterr().err


def test_stage_without_inputs_fails_cleanly(tmp_path, capsys):
    art = tmp_path / "art"
    sets = ["--set", f"project.artifacts_dir={art}", "--set", f"project.cache_dir={tmp_path / 'c'}"]
    assert main(["stage", "evaluate", *sets]) == 2
    err = capsys.readouterr().err
    assert f"stage evaluate needs {art / 'validate' / 'manifest.parquet'}" in err
    assert "run `headstart stage validate`" in err and "Traceback" not in err


def test_a_stage_refuses_while_a_flow_holds_the_project_lock(tmp_path, capsys):
    """dvc repro runs `headstart stage`: it must not overwrite artifacts a running flow is using."""
    from headstart.ops.lock import exclusive

    art = tmp_path / "art"
    sets = ["--set", f"project.artifacts_dir={art}", "--set", f"project.cache_dir={tmp_path / 'c'}"]
    with exclusive(tmp_path / "c" / "run.lock"):  # what a flow run holds while it runs
        assert main(["stage", "train_head", *sets]) == 2
    assert "another headstart run or stage" in capsys.readouterr().err
    assert not (art / "train_head").exists()


def test_domain_check_prints_json_and_exits_1_on_mismatch(tmp_path, capsys, tiny_weights):
    import json

    from tests.conftest import tiny_overrides

    data = make_folder(tmp_path / "data", per_class=10)
    sets = [x for o in tiny_overrides(tmp_path, data, tiny_weights) for x in ("--set", o)]
    code = main(["domain-check", "--data", str(data), "--json", *sets])
    report = json.loads(capsys.readouterr().out)
    assert code == (1 if report["verdict"] == "mismatch" else 0)
    assert report["on_mismatch"] == "continue" and report["n_images"] > 0


def test_prefect_yaml_deploys_the_training_flow_on_the_params_schedule():
    from pathlib import Path

    import yaml

    from headstart.config import load_params

    root = Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((root / "prefect.yaml").read_text())
    (deployment,) = spec["deployments"]
    module, _, name = deployment["entrypoint"].partition(":")
    flows = __import__(module.removesuffix(".py").replace("/", "."), fromlist=[name])
    assert getattr(flows, name).name == "training"
    assert deployment["schedules"][0]["cron"] == load_params(root / "params.yaml").schedule.cron
    assert deployment["parameters"]["skip_unchanged"] is True and deployment["concurrency_limit"] == 1
