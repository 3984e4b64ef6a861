"""A stage marked isolated (validate) runs in its own process inside the Prefect flow: Great
Expectations never enters the flow's process, its gate still stops the flow as a GateFailed, and a
child killed mid-stage fails the flow with one line."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from headstart.stages import get
from tests.conftest import make_folder, tiny_overrides, write_params

pytestmark = pytest.mark.slow


def _params(root, tiny_weights, *extra):
    data = make_folder(root / "data", per_class=12)
    return write_params(root / "params.yaml", [*tiny_overrides(root, data, tiny_weights), *extra])


class _TaskLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _without_gx(monkeypatch) -> None:
    """Take Great Expectations out of this process's modules (an earlier test may have imported it),
    so its presence after the flow can only mean the flow imported it here."""
    for name in [m for m in sys.modules if m.split(".")[0] == "great_expectations"]:
        monkeypatch.delitem(sys.modules, name)


def test_validate_runs_in_its_own_process_in_the_flow(tmp_path, tiny_weights, prefect_harness, monkeypatch):
    from flows.training import training

    assert get("validate").isolated
    _without_gx(monkeypatch)
    result = training(params_file=str(_params(tmp_path, tiny_weights)))
    assert "great_expectations" not in sys.modules
    report = json.loads((tmp_path / "artifacts" / "validate" / "report.json").read_text())
    assert report["success"] and result["validate"]["n_images"] == report["n_images"] == 24
    assert result["register"]["model_version"] == "1"  # the stages after it read what the child wrote


def test_a_failed_gate_in_the_child_fails_the_flow_as_a_gate_failure(
    tmp_path, tiny_weights, prefect_harness, monkeypatch
):
    from flows.training import training
    from headstart.validation import ValidationFailed

    _without_gx(monkeypatch)
    params = _params(tmp_path, tiny_weights, "validate.min_classes=3")
    (tmp_path / "data" / "cat" / "broken.png").write_bytes(b"")
    logged = _TaskLog()
    logging.getLogger("prefect.task_runs").addHandler(logged)
    try:
        state = training(params_file=str(params), return_state=True)
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(logged)
    exc = state.result(raise_on_failure=False)
    assert state.is_failed() and isinstance(exc, ValidationFailed), exc
    assert "enough_classes" in str(exc)
    failed = tmp_path / "artifacts" / "validate" / "failed"
    assert not json.loads((failed / "report.json").read_text())["success"]  # the gate's report
    assert "validate" in (tmp_path / "artifacts" / "report" / "index.html").read_text()  # failure report
    assert "great_expectations" not in sys.modules
    assert any(m.endswith("broken.png: empty file") for m in logged.lines)  # the child's print, logged


def test_a_child_killed_mid_stage_fails_the_flow_with_one_line(
    tmp_path, tiny_weights, prefect_harness, monkeypatch
):
    """A sitecustomize on the children's PYTHONPATH: a process started from now on that imports
    tasks.validate kills itself with SIGKILL (the flow's own process imported it long ago)."""
    import os

    from flows.training import training
    from headstart import HeadstartError

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal, sys\n"
        "class _Kill:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tasks.validate':\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "sys.meta_path.insert(0, _Kill())\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    state = training(params_file=str(_params(tmp_path, tiny_weights)), return_state=True)
    exc = state.result(raise_on_failure=False)
    assert state.is_failed() and type(exc) is HeadstartError, exc
    assert str(exc).startswith("stage validate: its process (pid ") and "killed by SIGKILL" in str(exc)
    assert not (tmp_path / "artifacts" / "validate" / "report.json").exists()
