"""The deployment in prefect.yaml run by a real `prefect worker` on a process work pool, against the
Prefect and MLflow servers of `headstart server start` on loopback: the commands README's "Scheduling
and scaling out" gives, in a project folder as a clone has it (prefect.yaml, flows/, params.yaml)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import make_folder, tiny_overrides, write_params
from tests.flows.test_schedule import _port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
ENDED = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def make_project(root: Path, tiny_weights, overrides: list[str] = ()) -> Path:
    """A project folder: the repo's prefect.yaml and flows/ beside a params.yaml for tiny data."""
    project = root / "project"
    shutil.copytree(ROOT / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prefect.yaml", project / "prefect.yaml")
    data = make_folder(root / "data", per_class=12)
    write_params(project / "params.yaml", [*tiny_overrides(root, data, tiny_weights), *overrides])
    return project


def prefect(*args: str, env: dict, cwd: Path) -> str:
    done = subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def flow_run(api: str, run_id: str) -> dict:
    with urllib.request.urlopen(f"{api}/flow_runs/{run_id}", timeout=30) as r:
        return json.loads(r.read())


def wait_ended(api: str, run_id: str, alive, log: Path, timeout: float = 420) -> dict:
    """The flow run once it has ended; fail at once when the process running it (`alive()`) dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = flow_run(api, run_id)
        if run["state_type"] in ENDED:
            return run
        assert alive(), log.read_text()[-3000:]
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not end in {timeout:.0f} s: {log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process's group (a worker and the flow runs it started), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_a_process_worker_runs_the_deployment_and_registers_the_model(tmp_path, tiny_weights, monkeypatch):
    from mlflow import MlflowClient

    from headstart.config import load_params
    from headstart.ops import server

    state = tmp_path / ".headstart"
    ports = [f"server.prefect_port={_port()}", f"server.mlflow_port={_port()}", f"server.state_dir={state}"]
    project = make_project(tmp_path, tiny_weights, ports)
    cfg = load_params(project / "params.yaml")
    # only the run this test triggers: no cron-scheduled run of prefect.yaml's nightly schedule
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED", "false")
    log, worker = tmp_path / "worker.log", None
    try:
        where = server.start(cfg)
        api, tracking = where["prefect"], where["mlflow"]
        client_env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect-home")}
        prefect("work-pool", "create", "headstart-process", "--type", "process", env=client_env, cwd=project)
        # the tracking URI goes into the deployment's job variables (prefect.yaml); the worker has none
        prefect("deploy", "--all", env={**client_env, "MLFLOW_TRACKING_URI": tracking}, cwd=project)
        worker_env = {
            **client_env,
            "HEADSTART_PROJECT_DIR": str(project),
            "PREFECT_WORKER_QUERY_SECONDS": "2",
        }
        with open(log, "w") as out:
            worker = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", "headstart-process"],
                cwd=tmp_path,
                env=worker_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        said = prefect("deployment", "run", "training/nightly", env=client_env, cwd=tmp_path)
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", said).group(1)
        run = wait_ended(api, run_id, lambda: worker.poll() is None, log)
        assert run["state_type"] == "COMPLETED", log.read_text()[-5000:]
        assert run["work_pool_name"] == "headstart-process" and run["infrastructure_pid"]

        mlflow = MlflowClient(tracking_uri=tracking)
        version = mlflow.get_model_version_by_alias("tiny", "champion")
        assert version.version == "1"
        assert mlflow.get_run(version.run_id).data.tags["prefect.flow_run_id"] == run_id
        assert (tmp_path / "artifacts" / "export" / "model.onnx").is_file()  # the project's params
    finally:  # whatever failed: nothing this test started is left running
        if worker is not None:
            stop_group(worker)
        stopped = server.stop(cfg)
    assert set(stopped) == {"prefect", "mlflow"} and worker.poll() is not None
    assert not any(server.status(cfg).values())


def test_a_server_that_fails_to_start_leaves_neither_running(tmp_path):
    """The MLflow server cannot bind its port: `start` says so, naming its log, and stops the Prefect
    server it had started too."""
    import socket

    from headstart import HeadstartError
    from headstart.config import load_params
    from headstart.ops import server

    state = tmp_path / ".headstart"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = load_params(
            None,
            [
                f"server.prefect_port={_port()}",
                f"server.mlflow_port={taken.getsockname()[1]}",
                f"server.state_dir={state}",
                f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                f"mlflow.artifact_location={tmp_path / 'mlruns'}",
            ],
        )
        with pytest.raises(HeadstartError, match="the mlflow server exited at start; see .*mlflow.log"):
            server.start(cfg)
    assert server.status(cfg) == {} and not (state / "servers.json").exists()
    with pytest.raises(OSError):  # the Prefect server, healthy before the MLflow one failed, is gone
        socket.create_connection(("127.0.0.1", cfg.server.prefect_port), timeout=2).close()
