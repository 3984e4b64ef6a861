"""The shared services as teams run them: a real PostgreSQL on loopback holds both the Prefect server's
database and the MLflow tracking store (`headstart server start` with server.prefect_database_url and
server.mlflow_backend_store_uri), and two projects' flow runs, at once, stay separate in them."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import pytest

from tests.conftest import make_folder, tiny_overrides, write_params
from tests.flows.test_orchestration import _park_hook
from tests.flows.test_schedule import _port

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

# the server refuses to run as root: as root (CI), it runs as the `postgres` user Debian's package makes
AS_ROOT = os.geteuid() == 0


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parents[1].name))
    assert found, "no PostgreSQL server here: apt-get install postgresql (.ci/run does), or -m 'not postgres'"
    return Path(found[-1]).parent


def _as_owner(cmd: list) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *map(str, cmd)] if AS_ROOT else [*map(str, cmd)]


@pytest.fixture
def postgres(tmp_path):
    """A throwaway PostgreSQL cluster on a free loopback port (trust auth: loopback only), stopped and
    deleted after the test. As root its folder is a fresh one in the system's temp dir, owned by
    `postgres`: pytest's tmp_path lies under a root-only (0700) folder that user cannot enter."""
    pg = _pg_bin()
    root = Path(tempfile.mkdtemp(prefix="headstart-pg-")) if AS_ROOT else tmp_path / "pg"
    root.mkdir(exist_ok=True)
    if AS_ROOT:
        shutil.chown(root, "postgres", "postgres")
    port, data, log = _port(), root / "data", root / "server.log"
    initdb = [pg / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync"]
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    start = [pg / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o", options, "start"]
    try:
        for cmd in (initdb, start):
            done = subprocess.run(_as_owner(cmd), capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (cmd[0].name, done.stderr, log.exists() and log.read_text())
        yield {"bin": pg, "port": port}
    finally:  # whatever failed: no server left running, no folder left behind
        subprocess.run(
            _as_owner([pg / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"]), capture_output=True
        )
        running = (data / "postmaster.pid").exists()
        if AS_ROOT and not running:
            shutil.rmtree(root)
        assert not running, f"PostgreSQL in {data} did not stop"


def _project(root: Path, data: Path, tiny_weights, model: str, servers: list[str]) -> Path:
    overrides = [*tiny_overrides(root, data, tiny_weights), f"register.model_name={model}", *servers]
    return write_params(root / "params.yaml", overrides)


def _rows(port: int, db: str, sql: str) -> list[tuple]:
    import psycopg2

    with closing(psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname=db)) as conn:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()


def _run_parked(params: Path, hook: Path, env: dict) -> subprocess.Popen:
    """`headstart run` of one project, parked once it holds its project lock (see _park_hook)."""
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))}
    with open(params.parent / "run.log", "w") as out:  # a file: a parked process never blocks on a pipe
        return subprocess.Popen(
            [sys.executable, "-m", "headstart.cli", "run", "--params", str(params)],
            cwd=params.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_two_projects_at_once_on_prefect_and_mlflow_servers_backed_by_postgres(
    tmp_path, tiny_weights, postgres
):
    from mlflow import MlflowClient

    from headstart.config import load_params
    from headstart.ops import server

    pg, port = postgres["bin"], postgres["port"]
    for db in ("prefect", "mlflow"):
        subprocess.run(
            [pg / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db], check=True
        )
    servers = [
        f"server.prefect_port={_port()}",
        f"server.mlflow_port={_port()}",
        f"server.state_dir={tmp_path / '.headstart'}",
        f"server.prefect_database_url=postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect",
        f"server.mlflow_backend_store_uri=postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow",
    ]
    projects = {
        name: _project(
            tmp_path / name, make_folder(tmp_path / name / "data", per_class=n), tiny_weights, name, servers
        )
        for name, n in (("tiny-a", 12), ("tiny-b", 13))
    }
    cfg = load_params(projects["tiny-a"])  # the team's servers, as either project's params name them
    try:
        where = server.start(cfg)
        flow_run_ids = _two_runs_at_once(tmp_path, projects, {**os.environ, **server.env(cfg)})
        mlflow, seen = MlflowClient(tracking_uri=where["mlflow"]), {}
        for name, params in projects.items():
            (found,) = mlflow.search_model_versions(f"name='{name}'")  # one version: its own run's
            version = mlflow.get_model_version(name, found.version)  # search leaves aliases out
            assert version.version == "1" and sorted(version.aliases) == ["best", "champion"]  # the first
            run = mlflow.get_run(version.run_id)
            assert run.info.status == "FINISHED"
            assert run.data.tags["prefect.flow_run_id"] == flow_run_ids[name]
            assert run.data.params["register.model_name"] == name
            assert run.data.params["prepare.data_dir"] == str(params.parent / "data")
            seen[name] = (run.info.run_id, flow_run_ids[name], run.data.tags["data_hash"])
        assert all(len({s[i] for s in seen.values()}) == 2 for i in range(3))  # runs, flow runs, data: apart

        # both stores are PostgreSQL's: the registry and the flow runs live in its databases
        models = _rows(port, "mlflow", "select name from registered_models order by name")
        assert [r[0] for r in models] == ["tiny-a", "tiny-b"]
        flow_runs = dict(_rows(port, "prefect", "select id::text, state_type::text from flow_run"))
        assert {i: "COMPLETED" for i in flow_run_ids.values()}.items() <= flow_runs.items()
    finally:
        stopped = server.stop(cfg)
    assert set(stopped) == {"prefect", "mlflow"}


def _two_runs_at_once(tmp_path: Path, projects: dict[str, Path], env: dict) -> dict[str, str]:
    """`headstart run` of each project, both parked holding their own project lock (so both flow runs
    are RUNNING on the one server), then released together; each project's flow run id, once both
    exited 0 (read from its log's "View at" line). No run is left parked or running, whatever fails."""
    release, runs = tmp_path / "release", {}
    try:
        for name, params in projects.items():
            _park_hook(tmp_path / f"hook-{name}", tmp_path / f"parked-{name}", release)
            runs[name] = _run_parked(params, tmp_path / f"hook-{name}", env)
        deadline = time.monotonic() + 300
        while not all((tmp_path / f"parked-{n}").exists() for n in runs) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in runs.values()), {n: p.poll() for n, p in runs.items()}
            time.sleep(0.2)
        assert all((tmp_path / f"parked-{n}").exists() for n in runs)
    finally:
        release.touch()
        for p in runs.values():
            p.wait(timeout=900)
    logs = {n: (projects[n].parent / "run.log").read_text() for n in runs}
    assert all(p.returncode == 0 for p in runs.values()), {n: logs[n][-3000:] for n in runs}
    return {n: re.search(r"/runs/flow-run/([0-9a-f-]{36})", logs[n]).group(1) for n in runs}  # "View at"
