"""Atomic writes: a killed run never leaves a half-written artifact that a later stage or DVC trusts."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from headstart import GateFailed, HeadstartError

FAILED = "failed"  # where a stage whose gate refused its result leaves its report
# In every folder directory() writes: only a folder carrying it is replaced whole, so a stage never
# deletes a folder it did not create (e.g. a class folder of the same name, were outputs pointed at
# the data). A file, not a name rule, because the stage folder's own name is the user's choice.
MARKER = ".headstart-output"


def _umask() -> int:
    """The process umask, read without changing it (os.umask sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide model.onnx from the team
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def directory(path: str | Path, mark: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `path` whole. A gate commits
    last: on GateFailed the filled folder becomes `path/failed/` (the report, for inspection) and
    everything else in `path`, the last good outputs, stays byte-identical; on any other error it
    vanishes. `path` must be absent, empty or an earlier output (MARKER); `mark=False` writes no
    MARKER, for folders that are data, not stage outputs."""
    path = Path(path)
    _check_owned(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the outputs from the team
    if mark:
        (tmp / MARKER).write_text("headstart writes this folder whole; it replaces it on the next run\n")
    try:
        yield tmp
    except GateFailed:
        path.mkdir(exist_ok=True)
        if mark and not (path / MARKER).exists():  # the failed/ it now holds is headstart's
            shutil.copy2(tmp / MARKER, path / MARKER)
        _swap(tmp, path / FAILED)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap(tmp, path)


def _check_owned(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise HeadstartError(f"{path} is not a folder headstart wrote; move it away or choose another folder")
    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).exists():
        raise HeadstartError(
            f"{path} holds files headstart did not write (no {MARKER}), so it will not replace it; "
            "move it away or point project.artifacts_dir elsewhere"
        )


def sweep(root: str | Path) -> list[Path]:
    """Remove the temporary and replaced folders and files (`.<name>.*.tmp`, `.<name>.old`) that a
    killed writer left in `root` and its subfolders one level down. Call it only while holding the
    project lock: then no live writer owns them."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p
        for d in (root, *(c for c in root.iterdir() if c.is_dir() and not c.is_symlink()))
        for p in _leftovers(d)
    ]
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def _leftovers(folder: Path) -> list[Path]:
    return [
        p
        for p in folder.iterdir()
        if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old"))
    ]


def _swap(new: Path, path: Path) -> None:
    """`new` takes the place of the folder `path` (if any), by renames only."""
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)
