"""headstart.atomic: files and folders appear whole or not at all."""

from __future__ import annotations

import json

import pytest

from headstart.atomic import MARKER, directory, write_bytes, write_json, write_text


def test_write_json_then_read(tmp_path):
    obj = {"b": [1, 2.5, "x"], "a": {"nested": True}, "path": tmp_path}
    path = write_json(tmp_path / "sub" / "out.json", obj)
    assert path == tmp_path / "sub" / "out.json"
    back = json.loads(path.read_text())
    assert back == {"b": [1, 2.5, "x"], "a": {"nested": True}, "path": str(tmp_path)}
    assert path.read_text().endswith("\n")
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_write_bytes_overwrites(tmp_path):
    path = tmp_path / "f.bin"
    write_bytes(path, b"one")
    write_text(path, "two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_write_bytes_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    write_bytes(path, b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("headstart.atomic.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def _tree(root):
    files = (p for p in root.rglob("*") if p.is_file() and p.name != MARKER)
    return {p.relative_to(root).as_posix(): p.read_text() for p in files}


def _earlier_output(out):
    """A folder as an earlier directory() left it: with its MARKER."""
    out.mkdir(parents=True)
    (out / MARKER).write_text("")
    return out


def test_directory_replaces_old_folder_whole(tmp_path):
    out = _earlier_output(tmp_path / "stage")
    (out / "deep").mkdir()
    (out / "stale.txt").write_text("old")
    (out / "deep" / "old.txt").write_text("old")

    with directory(out) as tmp:
        assert tmp != out and tmp.parent == out.parent and tmp.is_dir()
        (tmp / "new.txt").write_text("new")
        assert _tree(out) == {"stale.txt": "old", "deep/old.txt": "old"}  # untouched until the end

    assert _tree(out) == {"new.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]  # no temp or .old folder left


def test_directory_creates_new_folder(tmp_path):
    out = tmp_path / "a" / "b"
    with directory(out) as tmp:
        (tmp / "x").write_text("1")
    assert _tree(out) == {"x": "1"}


def test_directory_failure_leaves_old_folder_untouched(tmp_path):
    out = _earlier_output(tmp_path / "stage")
    (out / "keep.txt").write_text("old")

    with pytest.raises(RuntimeError, match="boom"):
        with directory(out) as tmp:
            (tmp / "partial.txt").write_text("half")
            raise RuntimeError("boom")

    assert _tree(out) == {"keep.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_directory_failure_without_old_folder_leaves_nothing(tmp_path):
    out = tmp_path / "stage"
    with pytest.raises(KeyboardInterrupt):
        with directory(out) as tmp:
            (tmp / "partial.txt").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
