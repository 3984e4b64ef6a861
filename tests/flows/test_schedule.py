"""A real Prefect server on loopback, the deployment served with a schedule firing every minute:
a completed scheduled run, a retrain after an image is added, a skip when nothing changed.

The data changes only while nothing can run: the deployment is paused (which deletes its pending
auto-scheduled runs) and every run in flight has ended. The retrain and the skip are then runs of
the same deployment created through the API, executed by the same `headstart schedule` process, each
awaited by its id: no step depends on when the cron fires next."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import make_folder, make_image, tiny_overrides, write_params

pytestmark = pytest.mark.slow

ENDED = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(api: str, path: str, body: dict):
    req = urllib.request.Request(
        f"{api}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def _runs(api: str) -> list[dict]:
    return _post(api, "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC", "limit": 50})


def _until(what: str, ready, api: str, serve: subprocess.Popen, log: Path, timeout: float = 240):
    """Poll ready(runs) until it returns something truthy; fail at once when a run fails or serve dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _runs(api)
        failed = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
        assert not failed, (failed, log.read_text()[-3000:])
        found = ready(runs)
        if found:
            return found
        assert serve.poll() is None, log.read_text()[-3000:]
        time.sleep(2)
    raise AssertionError(f"{what} did not happen in {timeout:.0f} s; serve log: {log.read_text()[-3000:]}")


def _run_now(api: str, deployment: str, serve: subprocess.Popen, log: Path) -> dict:
    """A run of the deployment created now, awaited until it completes."""
    run_id = _post(api, f"/deployments/{deployment}/create_flow_run", {})["id"]

    def completed(runs):
        return next((r for r in runs if r["id"] == run_id and r["state_type"] == "COMPLETED"), None)

    return _until(f"flow run {run_id}", completed, api, serve, log)


def test_scheduled_runs_train_retrain_and_skip(tmp_path, tiny_weights, monkeypatch):
    from headstart.config import load_params
    from headstart.ops import server

    data = make_folder(tmp_path / "data", per_class=12)
    overrides = [
        *tiny_overrides(tmp_path, data, tiny_weights),
        f"server.prefect_port={_port()}",
        f"server.mlflow_port={_port()}",
        f"server.state_dir={tmp_path / '.headstart'}",
    ]
    params = write_params(tmp_path / "params.yaml", overrides)
    cfg = load_params(params)
    last_success = cfg.project.cache_dir / "last_success.json"
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "5")  # the server schedules promptly
    where = server.start(cfg)
    api = where["prefect"]
    log = tmp_path / "serve.log"
    env = {**os.environ, **server.env(cfg), "MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri}
    with open(log, "w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "headstart.cli", "schedule", "--params", str(params)]
            + ["--cron", "* * * * *"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # the cron fires: a scheduled run of the served deployment trains version 1
        def first_completed(runs):
            return next((r for r in runs if r["state_type"] == "COMPLETED"), None)

        first = _until("a scheduled run", first_completed, api, serve, log)
        assert first["deployment_id"] and first["auto_scheduled"]
        deployment = first["deployment_id"]
        assert json.loads(last_success.read_text())["model_uri"].endswith("/1")

        # no scheduled run can start while the data changes
        _post(api, f"/deployments/{deployment}/pause_deployment", {})
        _until("every run ending", lambda runs: all(r["state_type"] in ENDED for r in runs), api, serve, log)
        assert json.loads(last_success.read_text())["model_uri"].endswith("/1")  # later runs skipped
        make_image(data / "dog" / "new_dog.png", (30, 200, 30), seed=77)  # new data arrives

        retrain = _run_now(api, deployment, serve, log)
        assert retrain["deployment_id"] == deployment and not retrain["auto_scheduled"]
        assert json.loads(last_success.read_text())["model_uri"].endswith("/2")

        skip = _run_now(api, deployment, serve, log)  # nothing changed since: skipped
        found = _post(
            api,
            "/artifacts/filter",
            {"artifacts": {"key": {"any_": ["skipped"]}, "flow_run_id": {"any_": [skip["id"]]}}},
        )
        assert found and "equal the last successful run" in found[0]["data"]
        assert json.loads(last_success.read_text())["model_uri"].endswith("/2")
    finally:
        serve.terminate()
        serve.wait(timeout=60)
        assert set(server.stop(cfg)) == {"prefect", "mlflow"}
    assert not any(server.status(cfg).values())
