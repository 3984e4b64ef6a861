"""headstart.data.manifest: scanning a folder, skipping what is not an image, hash-based splits."""

from __future__ import annotations

import hashlib
import os
import shutil

import pandas as pd
import pytest

from headstart import HeadstartError
from headstart.config import PrepareParams
from headstart.data.manifest import COLUMNS, assign_splits, data_hash, preflight, scan
from tests.conftest import COLOURS, make_folder, make_image

EXTS = PrepareParams().extensions


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _skipped(result) -> dict[str, str]:
    return dict(zip(result.skipped["path"], result.skipped["reason"], strict=True))


# --- scan -------------------------------------------------------------------------------------------


def test_scan_rows_labels_and_hashes(tmp_path):
    root = make_folder(tmp_path / "data", per_class=5, classes=("cat", "dog", "owl"))
    result = scan(root, EXTS)
    m = result.manifest
    assert list(m.columns) == COLUMNS
    assert len(m) == 15
    assert result.skipped.empty
    assert m["label"].value_counts().to_dict() == {"cat": 5, "dog": 5, "owl": 5}
    assert m["path"].is_unique
    for row in m.itertuples(index=False):
        assert row.path.split("/")[0] == row.label
        assert row.sha256 == _sha(root / row.path)
        assert (row.width, row.height, row.mode) == (40, 32, "RGB")
        assert row.bytes == (root / row.path).stat().st_size
    assert list(m["path"]) == sorted(m["path"])  # stable order


def test_scan_accepts_nested_files_and_uppercase_extension(tmp_path):
    root = make_folder(tmp_path / "data", per_class=2)
    make_image(root / "cat" / "sub" / "deep.PNG", COLOURS[0], seed=77)
    m = scan(root, EXTS).manifest
    row = m[m["path"] == "cat/sub/deep.PNG"]
    assert len(row) == 1 and row["label"].item() == "cat"


def test_scan_skips_bad_files_with_reasons(tmp_path):
    root = make_folder(tmp_path / "data", per_class=3)
    (root / "cat" / "fake.png").write_bytes(b"not an image")
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("hello")
    make_image(root / "stray.png", COLOURS[0], seed=500)
    make_image(root / "dog" / ".hidden.png", COLOURS[1], seed=501)
    make_image(root / ".thumbs" / "x.png", COLOURS[1], seed=502)
    # a truncated PNG: the header is readable, the pixels are not
    good = make_image(tmp_path / "whole.png", COLOURS[0], seed=503, size=(200, 200))
    (root / "cat" / "truncated.png").write_bytes(good.read_bytes()[:300])

    result = scan(root, EXTS)
    skipped = _skipped(result)
    manifest_paths = set(result.manifest["path"])

    expected = {
        "cat/fake.png": "not a readable image",
        "cat/empty.png": "empty file",
        "dog/notes.txt": "extension .txt",
        "stray.png": "not in a class folder",
        "dog/.hidden.png": "hidden file",
        ".thumbs/x.png": "hidden file",
        "cat/truncated.png": "not a readable image",
    }
    for path, reason in expected.items():
        assert path in skipped, path
        assert reason in skipped[path], (path, skipped[path])
        assert path not in manifest_paths
    assert len(result.manifest) == 6
    assert set(result.manifest["label"]) == {"cat", "dog"}


def _link(target, link):
    try:
        os.symlink(target, link)
    except OSError:
        pytest.skip("symlinks not supported here")


def test_scan_skips_symlink_outside_root(tmp_path):
    root = make_folder(tmp_path / "data", per_class=3)
    outside = make_image(tmp_path / "elsewhere" / "secret.png", COLOURS[0], seed=900)
    _link(outside, root / "cat" / "link.png")
    result = scan(root, EXTS)
    skipped = _skipped(result)
    assert "outside" in skipped["cat/link.png"]
    assert "cat/link.png" not in set(result.manifest["path"])


def test_scan_keeps_symlink_inside_root(tmp_path):
    root = make_folder(tmp_path / "data", per_class=3)
    _link(root / "cat" / "cat_000.png", root / "dog" / "alias.png")
    result = scan(root, EXTS)
    assert "dog/alias.png" in set(result.manifest["path"])


def test_scan_missing_folder(tmp_path):
    with pytest.raises(HeadstartError, match="nowhere"):
        scan(tmp_path / "nowhere", EXTS)


def test_scan_empty_folder(tmp_path):
    (tmp_path / "hollow").mkdir()
    with pytest.raises(HeadstartError, match="hollow") as exc:
        scan(tmp_path / "hollow", EXTS)
    assert "no readable images" in str(exc.value)


def test_scan_only_bad_files_names_first_skipped(tmp_path):
    root = tmp_path / "junk"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"not an image")
    with pytest.raises(HeadstartError, match="junk") as exc:
        scan(root, EXTS)
    assert "a/x.png" in str(exc.value)


def test_scan_single_class(tmp_path):
    root = make_folder(tmp_path / "solo", per_class=3, classes=("cat",))
    with pytest.raises(HeadstartError, match="solo") as exc:
        scan(root, EXTS)
    assert "one class" in str(exc.value) and "cat" in str(exc.value)


# --- preflight --------------------------------------------------------------------------------------


def test_preflight_counts(tmp_path):
    root = make_folder(tmp_path / "data", per_class=4)
    (root / "dog" / "notes.txt").write_text("x")
    make_image(root / ".hidden" / "h.png", COLOURS[0], seed=1)
    assert preflight(root, EXTS) == {"cat": 4, "dog": 4}


def test_preflight_missing_folder(tmp_path):
    with pytest.raises(HeadstartError, match="nowhere"):
        preflight(tmp_path / "nowhere", EXTS)


def test_preflight_empty_folder(tmp_path):
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    with pytest.raises(HeadstartError, match="hollow"):
        preflight(tmp_path / "hollow", EXTS)


def test_preflight_single_class(tmp_path):
    root = make_folder(tmp_path / "solo", per_class=3, classes=("cat",))
    with pytest.raises(HeadstartError, match="solo") as exc:
        preflight(root, EXTS)
    assert "one class" in str(exc.value)


# --- splits -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("big") / "data", per_class=40)


def test_assign_splits_deterministic_and_complete(big_folder):
    m = scan(big_folder, EXTS).manifest
    a = assign_splits(m, 0.15, 0.2, seed=0)
    b = assign_splits(m, 0.15, 0.2, seed=0)
    pd.testing.assert_series_equal(a, b)
    assert a.index.equals(m.index)
    assert set(a) <= {"train", "val", "test"}
    for label in ("cat", "dog"):
        assert set(a[m["label"] == label]) == {"train", "val", "test"}
    assert (a == "train").mean() > 0.5
    # a different seed gives a different split
    c = assign_splits(m, 0.15, 0.2, seed=1)
    assert not a.equals(c)


def test_adding_images_never_moves_existing_ones(big_folder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(big_folder, root)
    before_m = scan(root, EXTS).manifest
    before = dict(zip(before_m["path"], assign_splits(before_m, 0.15, 0.2, seed=0), strict=True))

    for c, name in enumerate(("cat", "dog")):
        for i in range(10):
            make_image(root / name / f"new_{i:03d}.png", COLOURS[c], seed=50_000 + 100 * c + i)
    after_m = scan(root, EXTS).manifest
    assert len(after_m) == len(before_m) + 20
    after = dict(zip(after_m["path"], assign_splits(after_m, 0.15, 0.2, seed=0), strict=True))
    moved = {p: (s, after[p]) for p, s in before.items() if after[p] != s}
    assert moved == {}


def test_duplicate_content_gets_same_split(big_folder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(big_folder, root)
    for i in range(10):
        shutil.copy(root / "cat" / f"cat_{i:03d}.png", root / "cat" / f"copy_{i:03d}.png")
    m = scan(root, EXTS).manifest
    split = dict(zip(m["path"], assign_splits(m, 0.15, 0.2, seed=0), strict=True))
    for i in range(10):
        assert split[f"cat/copy_{i:03d}.png"] == split[f"cat/cat_{i:03d}.png"]


def test_small_class_still_gets_val_and_test(tmp_path):
    root = make_folder(tmp_path / "data", per_class=4)
    m = scan(root, EXTS).manifest
    for seed in range(5):
        split = assign_splits(m, 0.15, 0.2, seed=seed)
        for label in ("cat", "dog"):
            got = split[m["label"] == label]
            assert {"val", "test"} <= set(got), (seed, label, list(got))
            assert "train" in set(got)


def test_duplicate_content_same_split_in_small_class():
    # cat has content A twice; with seed 2 every cat image hashes into train, so the lending
    # step moves rows into test and val, and picks the two copies of A one after the other
    rows = [("cat/a1", "cat", "A"), ("cat/a2", "cat", "A"), ("cat/b", "cat", "B"), ("cat/c", "cat", "C")]
    rows += [(f"dog/{i}", "dog", f"D{i}") for i in range(40)]
    m = pd.DataFrame(rows, columns=["path", "label", "sha256"])
    for seed in range(20):
        split = assign_splits(m, 0.15, 0.2, seed=seed)
        assert split[0] == split[1], (seed, list(split[:4]))


# --- data_hash --------------------------------------------------------------------------------------


def test_data_hash_ignores_order_and_tracks_content(tmp_path):
    root = make_folder(tmp_path / "data", per_class=4)
    m = scan(root, EXTS).manifest
    h = data_hash(m)
    assert len(h) == 64
    shuffled = m.sample(frac=1.0, random_state=3).reset_index(drop=True)
    assert not shuffled["path"].equals(m["path"])
    assert data_hash(shuffled) == h

    make_image(root / "cat" / "cat_000.png", COLOURS[0], seed=99_999)  # new content, same name
    m2 = scan(root, EXTS).manifest
    assert data_hash(m2) != h


def test_data_hash_tracks_relabel(tmp_path):
    root = make_folder(tmp_path / "data", per_class=4)
    m = scan(root, EXTS).manifest
    relabelled = m.copy()
    relabelled.loc[0, "label"] = "dog"
    assert data_hash(relabelled) != data_hash(m)
