"""Orchestration: skip a run when nothing changed, one run at a time, retries only for what is
transient, the MLflow run linked from the flow run."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from tests.conftest import make_folder, make_image, tiny_overrides, write_params

pytestmark = pytest.mark.slow


def _params(root, data, tiny_weights, *extra):
    return write_params(root / "params.yaml", [*tiny_overrides(root, data, tiny_weights), *extra])


def test_unchanged_data_is_skipped_and_new_data_retrains(
    tmp_path, tiny_weights, prefect_harness, monkeypatch
):
    from prefect.client.orchestration import get_client

    from flows.training import training
    from headstart import provenance

    data = make_folder(tmp_path / "data", per_class=12)
    params = str(_params(tmp_path, data, tiny_weights))
    first = training(params_file=params, skip_unchanged=True)
    assert not first.get("skipped") and first["register"]["model_version"] == "1"
    second = training(params_file=params, skip_unchanged=True)
    assert second["skipped"] and "equal the last successful run" in second["reason"]
    make_image(data / "cat" / "new_cat.png", (200, 30, 30), seed=99)
    third = training(params_file=params, skip_unchanged=True)
    assert not third.get("skipped") and third["register"]["model_version"] == "2"
    assert third["prepare"]["n_images"] == first["prepare"]["n_images"] + 1 and third["changed"] == ["data"]
    # a changed param retrains too; a manual run (no skip) always trains
    hidden = training(params_file=params, skip_unchanged=True, overrides=["train_head.hidden=16"])
    assert not hidden.get("skipped") and hidden["changed"] == ["params: train_head.hidden"]
    # so does a code fix (or a library upgrade): the same data and params, other code
    real = provenance.code_hash
    monkeypatch.setattr(provenance, "code_hash", lambda *modules: real(*modules) + "-edited")
    fixed = training(params_file=params, skip_unchanged=True, overrides=["train_head.hidden=16"])
    assert not fixed.get("skipped") and fixed["changed"] == ["code"]
    with get_client(sync_client=True) as prefect:
        keys = {a.key for a in prefect.read_artifacts()}
    assert {"skipped", "mlflow-run"} <= keys


def test_a_second_run_while_one_trains_is_refused_clearly(tmp_path, tiny_weights, prefect_harness):
    from flows.training import training
    from headstart.config import load_params
    from headstart.ops.lock import Busy, exclusive

    data = make_folder(tmp_path / "data", per_class=12)
    params = _params(tmp_path, data, tiny_weights)
    cfg = load_params(params)
    training(params_file=str(params))  # mlflow.db exists and holds one run
    with exclusive(cfg.project.cache_dir / "run.lock"):  # another run is training
        state = training(params_file=str(params), return_state=True)
    assert state.is_failed() and isinstance(state.result(raise_on_failure=False), Busy)
    assert "another headstart run" in str(state.result(raise_on_failure=False))
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _park_hook(hook, parked, release) -> None:
    """A sitecustomize for a subprocess's PYTHONPATH: once the run holds the project lock, it touches
    `parked` and waits until `release` exists. Nothing in the package knows of it."""
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import time\n"
        "from contextlib import contextmanager\n"
        "from pathlib import Path\n"
        "import headstart.ops.lock\n"
        "_exclusive = headstart.ops.lock.exclusive\n"
        "@contextmanager\n"
        "def exclusive(*args, **kwargs):\n"
        "    with _exclusive(*args, **kwargs):\n"
        f"        Path({str(parked)!r}).touch()\n"
        f"        while not Path({str(release)!r}).exists():\n"
        "            time.sleep(0.1)\n"
        "        yield\n"
        "headstart.ops.lock.exclusive = exclusive\n"
    )


def test_a_second_process_while_one_holds_the_lock_is_refused(tmp_path, tiny_weights):
    """Two `headstart run` processes on one project: the first is parked holding the project lock, the
    second, started only then, is refused with the lock's message (exit 2); the first, released, trains;
    the MLflow store is intact and holds one run."""
    import os
    import time

    data = make_folder(tmp_path / "data", per_class=12)
    params = _params(tmp_path, data, tiny_weights)
    exe = [sys.executable, "-m", "headstart.cli", "run", "--params", str(params)]
    hook, parked, release = tmp_path / "hook", tmp_path / "parked", tmp_path / "release"
    _park_hook(hook, parked, release)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    log = tmp_path / "first.log"  # a file, not a pipe: a parked process must never block on a full pipe
    with open(log, "w") as out:
        first = subprocess.Popen(exe, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None and not parked.exists():
            time.sleep(0.2)
        assert parked.exists() and first.poll() is None, (first.poll(), log.read_text()[-3000:])
        second = subprocess.run(exe, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "another headstart run" in second.stderr, second
    finally:
        release.touch()  # never leave the first run parked, whatever failed
        first.wait(timeout=900)
    assert first.returncode == 0, log.read_text()[-3000:]
    assert "Error logging to API" not in log.read_text()  # Prefect's queue drained before its server stops
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("select count(*) from runs").fetchone()[0] == 1


def test_only_transient_failures_are_retried():
    from types import SimpleNamespace

    from flows.training import _transient
    from headstart import HeadstartError, TransientError

    def state(exc):
        return SimpleNamespace(data=exc)

    assert _transient(None, None, state(TransientError("server down")))
    assert not _transient(None, None, state(OSError("disk hiccup")))  # only TransientError is retried
    assert not _transient(None, None, state(HeadstartError("bad data")))
    assert not _transient(None, None, state(ValueError("a bug")))


def test_a_killed_run_restarts_without_losing_work_and_ends_the_same(tmp_path, tiny_weights, prefect_harness):
    """`headstart run` killed (SIGKILL, whole process group) while extracting features; the rerun
    reuses what was computed and ends with the artifacts of an uninterrupted run."""
    import json
    import os
    import shutil
    import signal
    import time

    from flows.training import training

    data = make_folder(tmp_path / "data", per_class=24)
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    for d in (whole_dir, killed_dir):
        d.mkdir()
        shutil.copytree(data, d / "data")
    small_batches = "train_head.extract_batch_size=2"  # the kill lands between two batches
    whole = training(params_file=str(_params(whole_dir, whole_dir / "data", tiny_weights, small_batches)))

    # The run to be killed parks itself once 20 features are in the cache (the domain pass gives 16,
    # train_head the rest), so the kill lands mid-extraction on any machine, however fast: a
    # sitecustomize on its PYTHONPATH wraps FeatureCache.put; nothing in the package knows of it.
    hook, parked = tmp_path / "hook", tmp_path / "parked"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import time\n"
        "from pathlib import Path\n"
        "from headstart.features import FeatureCache\n"
        "_put, _n = FeatureCache.put, [0]\n"
        "def put(self, sha, vec):\n"
        "    _put(self, sha, vec)\n"
        "    _n[0] += 1\n"
        "    if _n[0] >= 20:\n"
        f"        Path({str(parked)!r}).touch()\n"
        "        time.sleep(3600)\n"
        "FeatureCache.put = put\n"
    )
    params = _params(killed_dir, killed_dir / "data", tiny_weights, small_batches)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "headstart.cli", "run", "--params", str(params)],
        cwd=killed_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    features = killed_dir / "cache" / "features"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and not parked.exists():
        time.sleep(0.2)
    assert parked.exists() and proc.poll() is None, f"the run never reached the kill point ({proc.poll()})"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    done_before = len(list(features.rglob("*.npy")))
    assert not (killed_dir / "artifacts" / "train_head").exists()  # killed mid-way: nothing half-written

    again = training(params_file=str(params))  # the dead run's lock is gone with it
    assert again["train_head"]["features_cached"] >= done_before > 0
    for stage, name in (
        ("train_head", "history.json"),
        ("evaluate", "metrics.json"),
        ("evaluate", "confusion.json"),
    ):
        a = json.loads((whole_dir / "artifacts" / stage / name).read_text())
        b = json.loads((killed_dir / "artifacts" / stage / name).read_text())
        assert a == b, (stage, name)
    assert again["evaluate"] == whole["evaluate"]
