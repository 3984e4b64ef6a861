"""Hostile-but-fair input at the front door (issue 14): paths are paths, params are sane, outputs never
touch inputs, a killed run leaves nothing behind, the tracking store is checked first, one line each."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from headstart import HeadstartError
from headstart.atomic import MARKER, directory, sweep, write_bytes
from headstart.cli import _overrides, _parser, main
from headstart.config import literal, load_params
from tests.conftest import make_folder, make_image, tiny_overrides, write_params

AWKWARD = [
    "photos #2",
    "x: y",
    "2024-01-01",
    "yes",
    "*raw",
    "&anchor",
    "a\tb\nc\"d\\e'f",
    "ü 😀",
    "bad\udc80name",  # an undecodable byte, as os.fsdecode gives it
]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("headstart: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _sets(tmp_path: Path) -> list[str]:
    return [
        "--set",
        f"project.artifacts_dir={tmp_path / 'art'}",
        "--set",
        f"project.cache_dir={tmp_path / 'c'}",
    ]


# --- 2: a path argument is a path, never YAML ----------------------------------------------------


@pytest.mark.parametrize("name", AWKWARD)
def test_data_option_is_the_path_exactly(tmp_path, name):
    args = _parser().parse_args(["validate", "--data", str(tmp_path / name)])
    assert load_params(None, _overrides(args)).prepare.data_dir == tmp_path / name
    assert load_params(None, [literal("train_head.backbone", name)]).train_head.backbone == name


def test_validate_reads_the_folder_named_with_a_hash_not_its_prefix(tmp_path, capsys):
    make_folder(tmp_path / "photos", per_class=12)  # what the YAML comment used to leave
    data = make_folder(tmp_path / "photos #2", per_class=13)
    assert main(["validate", "--data", str(data), *_sets(tmp_path)]) == 0
    manifest = pd.read_parquet(tmp_path / "art" / "prepare" / "manifest.parquet")
    assert len(manifest) == 26


def test_set_value_that_is_not_yaml_names_the_key_and_how_to_quote(capsys):
    assert main(["params", "--set", "schedule.cron=*/5 * * * *"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "schedule.cron" in line and "quote it" in line and "'schedule.cron=\"*/5 * * * *\"'" in line
    assert main(["params", "--set", 'schedule.cron="*/5 * * * *"']) == 0  # the advice works


# --- 3: outputs never delete inputs -------------------------------------------------------------


@pytest.mark.parametrize(
    "sets",
    [
        ["project.artifacts_dir={data}"],
        ["project.artifacts_dir={data}/.."],
        ["project.cache_dir={data}/cache"],
        ["project.artifacts_dir={tmp}/a", "project.cache_dir={tmp}/a/cache"],
    ],
)
def test_overlapping_data_artifacts_and_cache_are_refused_at_load(tmp_path, sets):
    data = make_folder(tmp_path / "data", per_class=2)
    overrides = [literal("prepare.data_dir", data)]
    overrides += [s.format(data=data, tmp=tmp_path) for s in sets]
    with pytest.raises(HeadstartError, match="overlap .*give each its own folder"):
        load_params(None, overrides)


def test_a_stage_never_replaces_a_folder_it_did_not_write(tmp_path):
    classes = make_folder(tmp_path / "data", per_class=2, classes=("validate", "prepare"))
    before = sorted(p.name for p in (classes / "validate").iterdir())
    with pytest.raises(HeadstartError, match=f"did not write \\(no {MARKER}\\)"):
        with directory(classes / "validate") as out:
            (out / "report.json").write_text("{}")
    assert sorted(p.name for p in (classes / "validate").iterdir()) == before
    assert [p.name for p in classes.iterdir() if p.name.startswith(".")] == []
    with directory(tmp_path / "art" / "validate") as out:  # its own output it replaces, run after run
        (out / "a").write_text("1")
    with directory(tmp_path / "art" / "validate") as out:
        (out / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "art" / "validate").iterdir()) == [MARKER, "b"]


# --- 8: what a killed run left is cleaned; the temporary server dies with it ---------------------


def _leftovers(art: Path) -> list[Path]:
    (art / ".export.x1y2.tmp").mkdir(parents=True)
    (art / ".export.x1y2.tmp" / "model.onnx").write_bytes(b"half")
    (art / ".validate.old").mkdir()
    (art / "run").mkdir()
    (art / "run" / ".mlflow.json.abc.tmp").write_text("{")
    return [art / ".export.x1y2.tmp", art / ".validate.old", art / "run" / ".mlflow.json.abc.tmp"]


def test_the_next_writer_sweeps_a_dead_runs_leftovers(tmp_path, capsys):
    art = tmp_path / "art"
    left = _leftovers(art)
    keep = write_bytes(art / "run" / "mlflow.json", b"{}")
    assert main(["stage", "evaluate", *_sets(tmp_path)]) == 2  # no inputs; it took the lock all the same
    assert not any(p.exists() for p in left) and keep.exists()
    assert sweep(art) == []


@pytest.mark.slow
def test_a_killed_run_takes_its_temporary_prefect_server_with_it(tmp_path, tiny_weights):
    """`headstart run` parked holding the project lock (so its Prefect API server is up), then
    SIGKILLed: every process it started is gone within seconds, and the next writer sweeps."""
    import psutil

    from tests.flows.test_orchestration import _park_hook

    data = make_folder(tmp_path / "data", per_class=8)
    params = write_params(tmp_path / "params.yaml", tiny_overrides(tmp_path, data, tiny_weights))
    hook, parked, release = tmp_path / "hook", tmp_path / "parked", tmp_path / "release"
    _park_hook(hook, parked, release)
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        run = subprocess.Popen(
            [sys.executable, "-m", "headstart.cli", "run", "--params", str(params)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and run.poll() is None and not parked.exists():
            time.sleep(0.2)
        assert parked.exists() and run.poll() is None, log.read_text()[-3000:]
        children = psutil.Process(run.pid).children(recursive=True)
        assert any("headstart.ops.ephemeral" in " ".join(c.cmdline()) for c in children), children
        _leftovers(tmp_path / "artifacts")
        run.kill()
        run.wait()
        gone, alive = psutil.wait_procs(children, timeout=20)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        release.touch()
        if run.poll() is None:
            run.kill()
    assert main(["stage", "evaluate", "--params", str(params)]) == 2
    assert [p.name for p in (tmp_path / "artifacts").iterdir() if p.name.startswith(".")] == []


# --- 11, 12: the tracking store checked first; damaged files are one line ------------------------


def _run_line(capsys, tmp_path, *extra: str) -> str:
    data = make_folder(tmp_path / "data", per_class=6)
    assert main(["run", "--data", str(data), *_sets(tmp_path), *extra]) == 2
    line = _one_line(capsys.readouterr().err)
    assert not (tmp_path / "art").exists()  # before any work
    return line


def test_an_unreachable_tracking_server_stops_run_before_any_work(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    line = _run_line(capsys, tmp_path, "--set", f"mlflow.tracking_uri=http://127.0.0.1:{port}")
    assert f"http://127.0.0.1:{port} does not answer" in line and "headstart server start" in line
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("damage", ["corrupted", "read-only", "missing folder"])
def test_an_unusable_sqlite_store_is_one_line_naming_the_file(tmp_path, capsys, damage):
    db = tmp_path / ("nowhere/mlflow.db" if damage == "missing folder" else "mlflow.db")
    if damage == "corrupted":
        db.write_bytes(os.urandom(4096))
    elif damage == "read-only":
        sqlite3.connect(db).execute("create table t (x)").connection.close()
        db.chmod(0o444)
    line = _run_line(capsys, tmp_path, "--set", f"mlflow.tracking_uri=sqlite:///{db}")
    assert str(db.parent if damage == "missing folder" else db) in line


def test_a_corrupted_store_outside_run_is_one_line(tmp_path, capsys):
    """promote opens the store through MLflow: its database error is classified, not a traceback."""
    from headstart.tracking import Registry

    db = tmp_path / "mlflow.db"
    db.write_bytes(os.urandom(4096))
    cfg = load_params(None, [f"mlflow.tracking_uri=sqlite:///{db}"])
    with pytest.raises(
        HeadstartError, match="MLflow store sqlite:///.*mlflow.db: open the store: .*not a database"
    ):
        Registry(cfg, "m")


@pytest.mark.parametrize("kind", ["binary", "utf-16", "folder", "not a mapping", "bad yaml"])
def test_a_bad_params_file_is_one_line_naming_it(tmp_path, capsys, kind):
    path = tmp_path / "params.yaml"
    if kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "utf-16":
        path.write_text("train_head:\n  lr: 0.1\n", encoding="utf-16")
    elif kind == "folder":
        path.mkdir()
    elif kind == "not a mapping":
        path.write_text("- a\n- b\n")
    else:
        path.write_text("train_head: [unclosed\n")
    assert main(["params", "--params", str(path)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(path) in line
    assert {"utf-16": "UTF-16", "folder": "is a folder", "binary": "not UTF-8"}.get(kind, "") in line


# --- 13: params values, promote --version ----------------------------------------------------------


@pytest.mark.parametrize(
    "override, words",
    [
        ("train_head.max_epochs=true", "valid integer"),
        ("train_head.lr=true", "got a boolean"),
        ("train_head.lr=.inf", "finite"),
        ("finetune.grad_clip=.nan", "finite"),
        ("schedule.timeout_s={train_head: .inf}", "finite"),
        ("train_head.hidden=1e11", "valid integer"),
        ("train_head.hidden=100000", "less than or equal to 16384"),
        ("train_head.batch_size=1000000", "less than or equal to 4096"),
        ("train_head.max_epochs=10000000", "less than or equal"),
        ("domain.max_images=100000000", "less than or equal"),
        ("export.parity_batch_sizes=[1, 100000]", "less than or equal"),
        ("project.seed=-1", "greater than or equal"),
    ],
)
def test_absurd_or_mistyped_params_are_refused_by_key(capsys, override, words):
    assert main(["params", "--set", override]) == 2
    line = _one_line(capsys.readouterr().err)
    assert override.split("=")[0] in line and words in line


@pytest.mark.parametrize("version", ["abc", "0", "-3", "1.5", "٣"])
def test_promote_version_must_be_a_positive_integer(tmp_path, capsys, version, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["promote", "--version", version]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--version {version!r}" in line and "positive integer" in line
    assert list(tmp_path.iterdir()) == []  # refused before touching any store


# --- 14: quarantine summarised; outputs respect the umask ------------------------------------------


def test_many_quarantined_files_print_a_bounded_summary(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=12)
    for i in range(45):
        (data / "cat" / f"empty_{i:02d}.png").write_bytes(b"")
    assert main(["validate", "--data", str(data), *_sets(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    named = [line for line in out if line.startswith("quarantined ")]
    assert len(named) == 20
    csv = tmp_path / "art" / "validate" / "quarantine.csv"
    assert f"... and 25 more quarantined (45 in all); every file and reason: {csv}" in out
    assert len(pd.read_csv(csv)) == 45  # nothing lost


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    before = os.umask(umask)
    try:
        path = write_bytes(tmp_path / "model.onnx", b"x")
        with directory(tmp_path / "export") as out:
            make_image(out / "plot.png", (1, 2, 3), seed=0)
    finally:
        os.umask(before)
    assert stat.S_IMODE(path.stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == dir_mode


@pytest.mark.parametrize("name", ["team/model", "a:b", " ", "x" * 300])
def test_a_model_name_mlflow_refuses_is_refused_at_load(name):
    """MLflow would refuse it only at register, after all the training."""
    with pytest.raises(HeadstartError, match="register.model_name"):
        load_params(None, [literal("register.model_name", name)])


@pytest.mark.parametrize("damage", [b"", b"\x00\x01not parquet", b"PAR1truncated"])
def test_a_damaged_stage_output_is_one_line_naming_it(tmp_path, capsys, damage):
    """A truncated manifest (or report) from an earlier stage: one line, the file and what to rerun."""
    sets = [
        "--set",
        f"project.artifacts_dir={tmp_path / 'a'}",
        "--set",
        f"project.cache_dir={tmp_path / 'c'}",
    ]
    (tmp_path / "a" / "validate").mkdir(parents=True)
    (tmp_path / "a" / "validate" / "manifest.parquet").write_bytes(damage)
    (tmp_path / "a" / "domain").mkdir()
    (tmp_path / "a" / "domain" / "report.json").write_bytes(damage[:3])
    (tmp_path / "a" / "backbone").mkdir()
    (tmp_path / "a" / "backbone" / "decision.json").write_text("{}")  # train_head reads the manifest first
    assert main(["stage", "train_head", *sets]) == 2
    err = capsys.readouterr().err
    assert "manifest.parquet is damaged" in err and "run the validate stage again" in err
    assert "Traceback" not in err


def test_a_damaged_server_record_reads_as_no_servers(tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    (state / "servers.json").write_text('{"prefect": "x", ')
    assert main(["server", "status", "--set", f"server.state_dir={state}"]) == 0
    assert "not started" in capsys.readouterr().out
