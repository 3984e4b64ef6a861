"""A stage's outputs reused when its inputs equal those of the run that wrote them, as `dvc repro`
does: each stage's input key covers the params it declares, the files it reads from earlier stages,
the data's content hash (when it reads the images), the source of every module it runs and the
library versions. A success leaves artifacts/<stage>/reuse.json: the key's parts, the hashes of the
outputs, and the stage's result; a later flow run whose parts are equal and whose outputs still hash
the same returns that result without running the stage."""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import time
from pathlib import Path
from types import SimpleNamespace

import headstart
from headstart.atomic import write_json
from headstart.config import flatten
from headstart.provenance import fingerprint_changes, library_versions
from headstart.stages import Stage

RECORD = "reuse.json"
PROJECT = ("headstart", "tasks")  # the packages a stage's code closure follows
# prepare finds the data (its hash is every later key's), register logs this flow run's MLflow run,
# promote reads the registry, report logs to this run and replaces a failed run's report: none of
# their results is a function of files alone
ALWAYS_RUN = frozenset({"prepare", "register", "promote", "report"})


def module_file(name: str) -> Path | None:
    """The source file of a project module ("headstart.features"), found without importing it."""
    parts = name.split(".")
    if parts[0] not in PROJECT:
        return None
    spec = importlib.util.find_spec(parts[0])  # the top package only: light, imported anyway
    path = Path(spec.submodule_search_locations[0]).joinpath(*parts[1:])
    for candidate in (path.with_suffix(".py") if len(parts) > 1 else None, path / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def imports(path: Path) -> set[Path]:
    """The project files `path` imports anywhere (lazy imports inside functions too), with the
    packages' __init__ files that importing them runs. Parsed once per version of the file (every
    stage's closure shares most of its modules: parsing them for each stage took the flow ~2.6 s)."""
    st = path.stat()
    return set(_imports(path, st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=1024)
def _imports(path: Path, _mtime_ns: int, _size: int) -> frozenset[Path]:
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                if (f := module_file(".".join(parts[:i]))) is not None:
                    found.add(f)
    return frozenset(found)


def closure(stage: Stage) -> set[Path]:
    """Every project source file the stage's task runs: tasks/<stage>.py and what it imports, transitively."""
    todo, seen = [module_file(f"tasks.{stage.name}")], set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += imports(path)
    return seen


def stage_code(stage: Stage) -> str:
    """sha256 of the stage's code closure and the package data it reads (Stage.files)."""
    root = module_file("headstart").parents[1]  # tasks/ and headstart/ sit side by side
    files = {_name(p, root): p for p in closure(stage)}
    return _hash_listing({**files, **{f: root / f for f in stage.files}})


def _name(path: Path, root: Path) -> str:
    """A file's name in the key: relative, so the same code in another checkout has the same key."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def inputs(cfg, stage: Stage, data_hash: str) -> dict:
    """The parts of the stage's input key (the run fingerprint's parts, narrowed to this stage)."""
    flat = flatten(cfg)
    params = {k: v for k, v in flat.items() if any(k == p or k.startswith(f"{p}.") for p in stage.params)}
    art = cfg.project.artifacts_dir
    return {
        "params": params,
        "deps": {d: path_hash(art / d) for d in stage.deps},
        "data_hash": data_hash if stage.reads_data else None,
        "code": stage_code(stage),
        "libraries": library_versions(),
        "version": headstart.__version__,
    }


def previous(cfg, stage: Stage, parts: dict) -> tuple[dict | None, list[str]]:
    """(the record of the success this run may reuse, or None; why not otherwise)."""
    record = _read(cfg.stage_dir(stage.name) / RECORD)
    if record is None:
        return None, ["no record of an earlier success"]
    changed = fingerprint_changes(record["parts"], parts)
    if changed:
        return None, changed
    now = outputs(cfg, stage)
    moved = [o for o in stage.outs if now.get(o) != record["outs"].get(o)]
    return (None, [f"output {o} changed or missing" for o in moved]) if moved else (record, [])


def remember(cfg, stage: Stage, parts: dict, result, flow_run_id: str) -> bool:
    """Record a success; False (and no record: the stage reruns next time) when its result is not
    plain data."""
    try:
        value = json.loads(json.dumps(result.__dict__, default=_plain))
    except (TypeError, ValueError, AttributeError):
        return False
    record = {
        "stage": stage.name,
        "parts": parts,
        "outs": outputs(cfg, stage),
        "result": value,
        "flow_run_id": flow_run_id,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(cfg.stage_dir(stage.name) / RECORD, record)
    return True


def result(record: dict) -> SimpleNamespace:
    """The recorded result, with the attributes the stage's own result has."""
    return SimpleNamespace(**record["result"])


def since(record: dict) -> str:
    return f"unchanged since flow run {record['flow_run_id']} ({record['finished_at']})"


def outputs(cfg, stage: Stage) -> dict[str, str | None]:
    return {o: path_hash(cfg.project.artifacts_dir / o) for o in stage.outs}


def path_hash(path: Path) -> str | None:
    """sha256 of a file's bytes, or of a folder's files with their relative names; None when absent."""
    if path.is_file():
        return _file_hash(path)
    if path.is_dir():
        return _hash_listing({p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()})
    return None


def _hash_listing(files: dict[str, Path]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        path = files[name]
        digest.update(f"{name}\t{path_hash(path)}\n".encode())
    return digest.hexdigest()


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _plain(value):
    """numpy scalars and arrays, paths and tuples as JSON; anything else makes the result unrecordable."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(type(value).__name__)


def _read(path: Path) -> dict | None:
    """The record, or None when missing or damaged (the stage then reruns and writes a good one)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        ok = all(isinstance(record.get(k), dict) for k in ("parts", "outs", "result"))
    except (OSError, ValueError, AttributeError):
        return None
    return (
        record if ok and all(isinstance(record.get(k), str) for k in ("flow_run_id", "finished_at")) else None
    )
