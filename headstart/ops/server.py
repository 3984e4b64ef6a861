"""`headstart server`: a Prefect server and an MLflow tracking server on loopback, their state under
the project folder (.headstart/), started in the background and stopped cleanly. Their stores are
SQLite files unless params name database servers (server.prefect_database_url,
server.mlflow_backend_store_uri: PostgreSQL, as teams run them). Prefect's own
`server start --background` / `server stop` would do for Prefect alone; `mlflow server` has no such
commands, so one mechanism runs both."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from headstart import HeadstartError
from headstart.config import Params
from headstart.ops.health import wait_healthy


def _state(cfg: Params) -> Path:
    return cfg.server.state_dir


def prefect_api(cfg: Params) -> str:
    return f"http://{cfg.server.host}:{cfg.server.prefect_port}/api"


def mlflow_url(cfg: Params) -> str:
    return f"http://{cfg.server.host}:{cfg.server.mlflow_port}"


def env(cfg: Params) -> dict[str, str]:
    """What a process needs to use these servers: the Prefect API and the MLflow tracking URI."""
    return {"PREFECT_API_URL": prefect_api(cfg), "MLFLOW_TRACKING_URI": mlflow_url(cfg)}


def start(cfg: Params, wait_s: float = 180) -> dict[str, str]:
    """Start both servers (if not running), wait until they answer, return their addresses."""
    state = _state(cfg)
    state.mkdir(parents=True, exist_ok=True)
    pids = _pids(cfg)
    if pids and all(_alive(p) for p in pids.values()):
        return {"prefect": prefect_api(cfg), "mlflow": mlflow_url(cfg), "state": str(state)}
    stop(cfg)
    bin_dir = Path(sys.executable).parent
    s = cfg.server
    tracking = s.mlflow_backend_store_uri or cfg.mlflow.tracking_uri
    if not (tracking.startswith("sqlite:") or s.mlflow_backend_store_uri):
        raise HeadstartError(
            f"headstart server serves a local sqlite store; mlflow.tracking_uri is {tracking}: "
            "set a sqlite:/// one, or the store in server.mlflow_backend_store_uri"
        )
    commands = {
        "prefect": [
            str(bin_dir / "prefect"),
            "server",
            "start",
            "--host",
            s.host,
            "--port",
            str(s.prefect_port),
        ],
        "mlflow": [
            str(bin_dir / "mlflow"),
            "server",
            "--host",
            s.host,
            "--port",
            str(s.mlflow_port),
            "--backend-store-uri",
            tracking,
            "--artifacts-destination",
            str(cfg.mlflow.artifact_location.resolve()),
            "--workers",
            "1",
        ],
    }
    environment = {
        **os.environ,
        "PREFECT_HOME": str((state / "prefect").resolve()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    if s.prefect_database_url:  # else Prefect's SQLite file under PREFECT_HOME
        environment["PREFECT_API_DATABASE_CONNECTION_URL"] = s.prefect_database_url
    pids = {}
    for name, cmd in commands.items():
        log = open(state / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it)
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
        pids[name] = proc.pid
    (state / "servers.json").write_text(json.dumps(pids))
    try:
        for name, url in (("prefect", f"{prefect_api(cfg)}/health"), ("mlflow", f"{mlflow_url(cfg)}/health")):
            _wait(name, url, pids[name], wait_s, state / f"{name}.log")
    except HeadstartError:
        stop(cfg)  # one failed: the other is not left running (and holding its port)
        raise
    return {"prefect": prefect_api(cfg), "mlflow": mlflow_url(cfg), "state": str(state)}


def stop(cfg: Params) -> list[str]:
    """Stop both servers (their whole process groups); returns what was stopped."""
    stopped = []
    for name, pid in _pids(cfg).items():
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 20
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
            stopped.append(name)
    (_state(cfg) / "servers.json").unlink(missing_ok=True)
    return stopped


def status(cfg: Params) -> dict[str, bool]:
    return {name: _alive(pid) for name, pid in _pids(cfg).items()}


def _pids(cfg: Params) -> dict[str, int]:
    """The servers' process ids as `start` recorded them; a damaged record counts as none (the
    servers it named, if alive, keep their ports: `start` then fails to bind and says so)."""
    path = _state(cfg) / "servers.json"
    try:
        pids = json.loads(path.read_text()) if path.exists() else {}
    except (ValueError, OSError):
        return {}
    if not isinstance(pids, dict) or not all(isinstance(v, int) and v > 0 for v in pids.values()):
        return {}
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of this process counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _wait(name: str, url: str, pid: int, wait_s: float, log: Path) -> None:
    wait_healthy(url, lambda: _alive(pid), wait_s, f"the {name} server", f"; see {log}")
