"""Hostile data folders (issue 14): links, special files, undecodable names, deep trees, odd pixels.

Each test builds its folder in tmp_path and asserts what a user sees: a row with its reason (and so a
quarantine entry), one HeadstartError line, or a validation failure that names the class."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from headstart import HeadstartError
from headstart.config import PrepareParams, ValidateParams, load_params
from headstart.data.inspection import InspectionCache, inspect_bytes, inspect_files
from headstart.data.manifest import OUTSIDE, assign_splits, preflight, scan
from headstart.validation import failure_message, validate_manifest
from tests.conftest import make_folder
from tests.unit import imagebytes as ib

EXTS = PrepareParams().extensions
RELAXED = ValidateParams(min_per_class=1, min_per_split={"train": 1, "val": 0, "test": 0})


def _prepare(root: Path, tmp_path: Path) -> pd.DataFrame:
    """What tasks/prepare.py does: scan, then split the readable rows."""
    m = scan(root, EXTS, tmp_path / "cache")
    ok = m["readable"]
    m["split"] = ""
    m.loc[ok, "split"] = assign_splits(m[ok], 0.15, 0.2, 0)
    return m


def _reasons(m: pd.DataFrame) -> dict[str, str]:
    bad = m[~m["readable"]]
    return dict(zip(bad["path"], bad["reason"], strict=True))


def _candidates(m: pd.DataFrame) -> dict[str, int]:
    """Images per class as the scan saw them: the rows it decoded (hashed) plus the unreadable ones."""
    return m[m["sha256"] != ""]["label"].value_counts().sort_index().to_dict()


# --- 4: links -----------------------------------------------------------------------------------------


def test_class_folder_linked_inside_the_root_is_followed_and_all_agree(tmp_path):
    root = make_folder(tmp_path / "data", per_class=6, classes=("cat",))
    make_folder(root / ".store", per_class=6, classes=("cat", "dog"))  # hidden: read only through links
    shutil.rmtree(root / ".store" / "cat")
    os.symlink(root / ".store" / "dog", root / "dog")  # an absolute link
    os.symlink("../../cat/cat_000.png", root / ".store" / "dog" / "alias.png")  # a relative file link
    counts = preflight(root, EXTS)
    assert counts == {"cat": 6, "dog": 7}
    m = _prepare(root, tmp_path)
    assert m["readable"].all() and _candidates(m) == counts
    assert "dog/alias.png" in set(m["path"])
    v = validate_manifest(m, RELAXED, None)
    assert v.report["success"], failure_message(v.report, Path("r.json"))
    assert set(v.clean["label"]) == {"cat", "dog"}


def test_class_folder_linked_out_of_the_root_is_named_by_precheck_scan_and_validation(tmp_path):
    root = make_folder(tmp_path / "data", per_class=6)
    secret = make_folder(tmp_path / "elsewhere", per_class=6, classes=("owl",))
    os.symlink(secret / "owl", root / "owl")
    with pytest.raises(HeadstartError, match=r"class folder owl has no image.*owl/: resolves outside"):
        preflight(root, EXTS)
    m = _prepare(root, tmp_path)
    assert _reasons(m)["owl/"].startswith(OUTSIDE)
    assert str(secret / "owl") in _reasons(m)["owl/"]  # says where it points
    assert (m.loc[m["label"] == "owl", "sha256"] == "").all()  # nothing behind the link was read
    v = validate_manifest(m, RELAXED, None)
    assert "owl/" in set(v.quarantine["path"])
    assert not v.report["success"]
    line = failure_message(v.report, Path("report.json"))
    assert "owl/train: 0 images" in line and "\n" not in line


def test_class_that_vanishes_after_the_precheck_fails_validation_by_name(tmp_path):
    root = make_folder(tmp_path / "data", per_class=6, classes=("cat", "dog"))
    make_folder(root / ".store", per_class=6, classes=("owl",))
    os.symlink(root / ".store" / "owl", root / "owl")
    assert preflight(root, EXTS) == {"cat": 6, "dog": 6, "owl": 6}
    shutil.rmtree(root / ".store" / "owl")  # between `headstart run`'s pre-check and prepare's scan
    m = _prepare(root, tmp_path)
    assert _reasons(m) == {"owl/": "broken link"}  # at the top level, a class folder that was
    v = validate_manifest(m, RELAXED, None)
    assert "min_per_class_per_split" in v.report["failed"]
    assert "owl/train: 0 images" in failure_message(v.report, Path("report.json"))


def test_link_loop_is_listed_not_walked_forever(tmp_path):
    root = make_folder(tmp_path / "data", per_class=3)
    os.symlink(root / "cat", root / "cat" / "again")
    os.symlink(root, root / "dog" / "top")
    reasons = _reasons(_prepare(root, tmp_path))
    assert reasons["cat/again/"].startswith("link loop")
    assert reasons["dog/top/"].startswith("link loop")
    assert preflight(root, EXTS) == {"cat": 3, "dog": 3}


# --- 6: special files ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_special_files_are_listed_never_opened(tmp_path):
    root = make_folder(tmp_path / "data", per_class=6)
    os.mkfifo(root / "cat" / "pipe.png")
    os.symlink(root / "cat" / "pipe.png", root / "dog" / "pipe_link.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "dog" / "sock.png"))
    expected = {"cat/pipe.png": "fifo", "dog/pipe_link.png": "fifo", "dog/sock.png": "socket"}
    try:
        os.mknod(root / "cat" / "null.png", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        expected["cat/null.png"] = "character device"
    except OSError:  # no CAP_MKNOD here: the fifo and the socket still cover the rule
        pass
    assert preflight(root, EXTS) == {"cat": 6, "dog": 6}
    m = _prepare(root, tmp_path)
    sock.close()
    reasons = _reasons(m)
    assert set(reasons) == set(expected)
    for path, kind in expected.items():
        assert reasons[path].startswith(f"not a regular file ({kind})"), reasons[path]
    v = validate_manifest(m, RELAXED, None)
    assert set(v.quarantine["path"]) == set(expected) and v.report["success"]


@pytest.mark.timeout(60)
def test_a_fifo_swapped_in_after_the_scan_is_not_read(tmp_path):
    os.mkfifo(tmp_path / "late.png")
    (row,) = inspect_files([tmp_path / "late.png"], InspectionCache(tmp_path / "cache"), workers=1)
    assert not row["readable"] and row["reason"] == "cannot be read"


# --- 7: names that are not UTF-8 ----------------------------------------------------------------------


def test_non_utf8_names_are_quarantined_shown_escaped_and_written(tmp_path):
    root = make_folder(tmp_path / "data", per_class=6)
    cat = os.fsencode(root / "cat")
    with open(os.path.join(cat, b"caf\xe9.png"), "wb") as f:
        f.write(ib.png(1))
    os.mkdir(os.path.join(cat, b"\xff\xfe"))
    with open(os.path.join(cat, b"\xff\xfe", b"x.png"), "wb") as f:
        f.write(ib.png(2))
    assert preflight(root, EXTS) == {"cat": 6, "dog": 6}
    m = _prepare(root, tmp_path)
    reasons = _reasons(m)
    assert set(reasons) == {"cat/caf\\xe9.png", "cat/\\xff\\xfe/"}
    assert all(r.startswith("name is not valid UTF-8") for r in reasons.values())
    m.to_parquet(tmp_path / "manifest.parquet", index=False)
    assert set(pd.read_parquet(tmp_path / "manifest.parquet")["path"]) == set(m["path"])
    v = validate_manifest(m, RELAXED, None)
    v.quarantine.to_csv(tmp_path / "quarantine.csv", index=False)
    assert set(pd.read_csv(tmp_path / "quarantine.csv")["path"]) == set(reasons)


# --- 12: deep trees -----------------------------------------------------------------------------------


def test_folders_nested_1500_deep_are_scanned_without_recursion(tmp_path):
    root = make_folder(tmp_path / "data", per_class=6)
    deep = root / "cat"
    for _ in range(1500):  # os.makedirs would recurse once per level
        deep = deep / "d"
        deep.mkdir()
    (deep / "bottom.png").write_bytes(ib.png(3))
    try:
        assert preflight(root, EXTS) == {"cat": 7, "dog": 6}
        m = _prepare(root, tmp_path)
        bottom = m[m["path"].str.endswith("/bottom.png")]
        assert len(bottom) == 1 and bottom["readable"].item() and bottom["label"].item() == "cat"
        assert bottom["path"].item().count("/") == 1501
    finally:
        (deep / "bottom.png").unlink()
        while deep != root / "cat":  # shutil.rmtree recurses too
            deep.rmdir()
            deep = deep.parent


# --- 13: misleading messages --------------------------------------------------------------------------


def test_a_file_given_as_the_data_folder_is_called_a_file(tmp_path):
    (tmp_path / "photos.zip").write_bytes(b"PK")
    for check in (preflight, lambda r, e: scan(r, e, tmp_path / "cache")):
        with pytest.raises(HeadstartError, match=r"photos.zip is a file, not a folder"):
            check(tmp_path / "photos.zip", EXTS)


def test_hidden_files_are_ignored_not_counted_as_unreadable(tmp_path):
    root = make_folder(tmp_path / "data", per_class=6)
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "cat" / "._cat_000.png").write_bytes(b"\0\5\26\7")  # macOS resource fork, an image's name
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    m = _prepare(root, tmp_path)
    assert len(m) == 12 and m["readable"].all()
    v = validate_manifest(m, RELAXED, None)
    assert v.report["n_quarantined"] == 0 and not v.report["warnings"]


def _unreadable(monkeypatch, *names: str) -> None:
    """os.scandir refuses these folders, as chmod 000 does for anyone but root (the tests run as root)."""
    real = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and os.path.basename(os.fspath(path)) in names:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_subfolder_is_reported(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", per_class=6)
    make_folder(root / "cat" / "private", per_class=2, classes=("x",))
    _unreadable(monkeypatch, "private")
    m = _prepare(root, tmp_path)
    assert _reasons(m) == {
        "cat/private/": "folder cannot be read (Permission denied): "
        "give read access or move it out of the data folder"
    }
    v = validate_manifest(m, RELAXED, None)
    assert list(v.quarantine["path"]) == ["cat/private/"]


def test_an_unreadable_class_folder_stops_the_precheck_by_name(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", per_class=6, classes=("cat", "dog", "owl"))
    _unreadable(monkeypatch, "owl")
    with pytest.raises(HeadstartError, match=r"class folder owl has no image.*Permission denied"):
        preflight(root, EXTS)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 folder; the monkeypatched twin runs")
def test_a_chmod_000_subfolder_is_reported(tmp_path):
    root = make_folder(tmp_path / "data", per_class=6)
    make_folder(root / "cat" / "private", per_class=2, classes=("x",))
    (root / "cat" / "private").chmod(0)
    try:
        assert _reasons(_prepare(root, tmp_path))["cat/private/"].startswith("folder cannot be read")
    finally:
        (root / "cat" / "private").chmod(0o755)


def test_extensions_without_a_dot_are_normalised(tmp_path):
    assert PrepareParams(extensions=["png", "JPG", " .Tif ", ".png"]).extensions == [".png", ".jpg", ".tif"]
    root = make_folder(tmp_path / "data", per_class=3)
    cfg = load_params(None, [f"prepare.data_dir={root}", "prepare.extensions=[png]"])
    assert preflight(root, cfg.prepare.extensions) == {"cat": 3, "dog": 3}


@pytest.mark.parametrize("bad", ["*.png", "tar.gz", "", "a/b", "."])
def test_extensions_that_are_no_suffix_are_refused_in_one_line(bad):
    with pytest.raises(HeadstartError, match=r"prepare\.extensions.*not a file extension.*e\.g\. \.png"):
        load_params(None, [f"prepare.extensions=['{bad}']"])


def test_no_extensions_is_refused():
    with pytest.raises(HeadstartError, match=r"prepare\.extensions.*no extensions"):
        load_params(None, ["prepare.extensions=[]"])


def test_invalid_exif_orientation_is_not_called_rotated():
    img = Image.fromarray(np.full((40, 48, 3), 120, np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 99
    info = inspect_bytes(ib.encode(img, "JPEG", exif=exif.tobytes()))
    assert info["readable"] and not info["exif_rotated"]
    assert (info["width"], info["height"]) == (48, 40)  # ignored, as decoding ignores it
    assert inspect_bytes(ib.exif_rotated_jpeg(1))["exif_rotated"]


def test_one_class_is_said_in_words(tmp_path):
    root = make_folder(tmp_path / "data", per_class=6, classes=("cat",))
    v = validate_manifest(_prepare(root, tmp_path), RELAXED, None)
    line = failure_message(v.report, Path("report.json"))
    assert "enough_classes: found 1 class (cat); need at least 2" in line
    assert "unexpected" not in line


# --- 10: non-finite pixels ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_image_with_non_finite_pixels_is_quarantined(tmp_path, bad):
    arr = np.linspace(0, 1, 40 * 48, dtype=np.float32).reshape(40, 48)
    fine = ib.encode(Image.fromarray(arr), "TIFF")
    arr[7, 9] = bad
    broken = ib.encode(Image.fromarray(arr), "TIFF")
    assert inspect_bytes(fine)["readable"] and inspect_bytes(fine)["mode"] == "F"
    info = inspect_bytes(broken)
    assert not info["readable"] and info["reason"].startswith("non-finite pixel values")
    root = make_folder(tmp_path / "data", per_class=6)
    (root / "cat" / "float.tif").write_bytes(broken)
    v = validate_manifest(_prepare(root, tmp_path), RELAXED, None)
    assert dict(zip(v.quarantine["path"], v.quarantine["reason"], strict=True)) == {
        "cat/float.tif": info["reason"]
    }
    assert "cat/float.tif" not in set(v.clean["path"])
