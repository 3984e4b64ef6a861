"""A real Prefect server on loopback, the deployment served with a schedule firing every minute:
a completed scheduled run, a retrain after an image is added, a skip when nothing changed."""

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


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(api: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        f"{api}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _completed(api: str) -> list[dict]:
    runs = _post(api, "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC", "limit": 50})
    return [r for r in runs if r["state_type"] == "COMPLETED"]


def _wait_for(api: str, n: int, serve: subprocess.Popen, log: Path, timeout: float = 240) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = _completed(api)
        if len(done) >= n:
            return done
        failed = [
            r
            for r in _post(api, "/flow_runs/filter", {"limit": 50})
            if r["state_type"] in ("FAILED", "CRASHED")
        ]
        assert not failed, (failed, log.read_text()[-3000:])
        assert serve.poll() is None, log.read_text()[-3000:]
        time.sleep(3)
    raise AssertionError(f"fewer than {n} completed scheduled runs; serve log: {log.read_text()[-3000:]}")


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
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "5")  # the server schedules promptly
    where = server.start(cfg)
    api = where["prefect"]
    log = tmp_path / "serve.log"
    env = {**os.environ, **server.env(cfg), "MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri}
    with open(log, "w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "headstart.cli", "serve", "--params", str(params), "--cron", "* * * * *"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        first = _wait_for(api, 1, serve, log)
        assert first[0]["deployment_id"] and first[0]["auto_scheduled"]
        state = json.loads((cfg.project.cache_dir / "last_success.json").read_text())
        assert state["model_uri"].endswith("/1")
        make_image(data / "dog" / "new_dog.png", (30, 200, 30), seed=77)  # new data arrives
        _wait_for(api, 2, serve, log)
        assert json.loads((cfg.project.cache_dir / "last_success.json").read_text())["model_uri"].endswith(
            "/2"
        )
        _wait_for(api, 3, serve, log)  # nothing changed since: skipped
        skipped = _post(api, "/artifacts/filter", {"artifacts": {"key": {"any_": ["skipped"]}}})
        assert skipped and "equal the last successful run" in skipped[0]["data"]
        assert json.loads((cfg.project.cache_dir / "last_success.json").read_text())["model_uri"].endswith(
            "/2"
        )
    finally:
        serve.terminate()
        serve.wait(timeout=60)
        assert set(server.stop(cfg)) == {"prefect", "mlflow"}
    assert not any(server.status(cfg).values())
