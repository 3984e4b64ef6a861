"""headstart.data.builtin: the built-in data sets materialise deterministically as image folders."""

from __future__ import annotations

import hashlib

import pytest
from PIL import Image

from headstart import HeadstartError
from headstart.config import PrepareParams
from headstart.data.builtin import pull
from headstart.data.manifest import scan


def _files(root) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_pull_lfw(tmp_path):
    out = tmp_path / "lfw"
    counts = pull("lfw", out, per_class=3)
    assert counts == {"face": 3, "non_face": 3}
    files = _files(out)
    assert len(files) == 6
    for cls in ("face", "non_face"):
        pngs = sorted((out / cls).glob("*.png"))
        assert len(pngs) == 3
        for p in pngs:
            with Image.open(p) as img:
                assert img.format == "PNG" and img.size == (25, 25)
    # the folder is a valid headstart data folder
    assert [p.name for p in tmp_path.iterdir()] == ["lfw"]  # no temp folder left
    m = scan(out, PrepareParams().extensions, tmp_path / "cache")
    assert len(m) == 6 and m["readable"].all()


def test_pull_lfw_is_deterministic(tmp_path):
    pull("lfw", tmp_path / "a", per_class=3, seed=7)
    pull("lfw", tmp_path / "b", per_class=3, seed=7)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    pull("lfw", tmp_path / "c", per_class=3, seed=8)
    assert _files(tmp_path / "c") != _files(tmp_path / "a")


def test_pull_lfw_all(tmp_path):
    assert pull("lfw", tmp_path / "all") == {"face": 100, "non_face": 100}


def test_pull_elpv_defect(tmp_path):
    out = tmp_path / "elpv"
    counts = pull("elpv", out, task="defect", per_class=4)
    assert counts == {"defective": 4, "functional": 4}
    assert sorted(p.name for p in out.iterdir()) == ["defective", "functional"]
    for cls in ("defective", "functional"):
        assert len(list((out / cls).glob("*.png"))) == 4
    m = scan(out, PrepareParams().extensions, tmp_path / "cache")
    assert len(m) == 8 and m["readable"].all()


def test_pull_elpv_type(tmp_path):
    out = tmp_path / "elpv"
    counts = pull("elpv", out, task="type", per_class=4)
    assert counts == {"mono": 4, "poly": 4}
    assert sorted(p.name for p in out.iterdir()) == ["mono", "poly"]


def test_pull_elpv_deterministic(tmp_path):
    pull("elpv", tmp_path / "a", task="defect", per_class=2, seed=3)
    pull("elpv", tmp_path / "b", task="defect", per_class=2, seed=3)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_pull_into_non_empty_folder_raises(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "mine.txt").write_text("do not touch")
    with pytest.raises(HeadstartError, match="not empty"):
        pull("lfw", out, per_class=1)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_pull_into_existing_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert pull("lfw", out, per_class=1) == {"face": 1, "non_face": 1}


def test_unknown_dataset_raises(tmp_path):
    with pytest.raises(HeadstartError, match="mnist"):
        pull("mnist", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unknown_elpv_task_raises(tmp_path):
    with pytest.raises(HeadstartError, match="colour"):
        pull("elpv", tmp_path / "x", task="colour")


def test_per_class_zero_raises(tmp_path):
    with pytest.raises(HeadstartError, match="per-class"):
        pull("lfw", tmp_path / "x", per_class=0)
