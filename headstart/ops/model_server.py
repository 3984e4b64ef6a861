"""`mlflow models serve` for a registered version, on loopback, as a process group: started, waited
for (/ping) and stopped whole. For the end-to-end test and the serving benchmark; users run MLflow's
command themselves (README: Serving)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from headstart.ops.server import wait_healthy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(model_uri: str, tracking_uri: str, log: Path, wait_s: float = 180) -> Iterator[tuple[str, int]]:
    """(base URL, server pid) of `mlflow models serve -m model_uri --env-manager local` on a free
    loopback port while the block runs; its whole process group is stopped after."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    # MLflow execs `uvicorn` by name: this Python's environment first on PATH, as an activated venv
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(
            f"{url}/ping", lambda: proc.poll() is None, wait_s, "mlflow models serve", f"; see {log}"
        )
        yield url, proc.pid
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, wait_s: float = 20) -> None:
    """SIGTERM to the process group (uvicorn and its worker), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
