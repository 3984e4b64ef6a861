"""The temporary Prefect API server of one `headstart run`, bound to the life of that process.

Prefect's own ephemeral mode (SubprocessASGIServer) stops its uvicorn child from an atexit hook, so
a `kill -9` of the run leaves a ~200 MB server behind for good. This one runs the same app (Prefect's
`create_app` factory, in ephemeral mode) in a child that dies with its parent: on Linux the kernel
signals it (PR_SET_PDEATHSIG); everywhere a watcher thread sees its parent change and stops it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from headstart.ops.health import wait_healthy

PR_SET_PDEATHSIG = 1


@contextmanager
def server(wait_s: float = 120.0, meanwhile: Callable[[], object] | None = None) -> Iterator[str]:
    """Start the server, run `meanwhile` while it boots, yield its API URL once it answers, stop it
    at the end (also when `meanwhile` raises)."""
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "headstart.ops.ephemeral", str(os.getpid()), str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        if meanwhile is not None:
            meanwhile()
        url = f"http://127.0.0.1:{port}/api"
        wait_healthy(f"{url}/health", lambda: proc.poll() is None, wait_s, "the temporary Prefect server")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with(parent: int) -> None:
    """Stop this process (SIGTERM: uvicorn shuts down cleanly) when `parent` is gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def main(parent: int, port: int) -> None:
    _die_with(parent)  # also covers a parent that died before the prctl: getppid() differs already
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
