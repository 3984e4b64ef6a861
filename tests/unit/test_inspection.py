"""headstart.data.inspection: what one decode records for every kind of file, the phash, the cache."""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import headstart.data.inspection as inspection
from headstart.data.inspection import FIELDS, InspectionCache, hamming, inspect_bytes, inspect_files, phash
from tests.unit import imagebytes as ib

# --- inspect_bytes: readable files -------------------------------------------------------------------

READABLE = {
    # name: (bytes, format, mode, channels, bit_depth, frames, (width, height) after EXIF)
    "png": (ib.png(1), "PNG", "RGB", 3, 8, 1, (48, 40)),
    "jpeg": (ib.jpeg(2), "JPEG", "RGB", 3, 8, 1, (48, 40)),
    "rgba": (ib.rgba(3), "PNG", "RGBA", 4, 8, 1, (48, 40)),
    "palette_transparent": (ib.palette_transparent(4), "PNG", "P", 1, 8, 1, (48, 40)),
    "grey": (ib.grey(5), "PNG", "L", 1, 8, 1, (48, 40)),
    "cmyk_jpeg": (ib.cmyk_jpeg(6), "JPEG", "CMYK", 4, 8, 1, (48, 40)),
    "grey16": (ib.grey16(7), "PNG", "I;16", 1, 16, 1, (48, 40)),
    "animated_gif": (ib.animated_gif(8), "GIF", "P", 1, 8, 3, (48, 40)),
    "exif_rotated": (ib.exif_rotated_jpeg(9), "JPEG", "RGB", 3, 8, 1, (40, 48)),
    "1x1": (ib.encode(Image.new("RGB", (1, 1)), "PNG"), "PNG", "RGB", 3, 8, 1, (1, 1)),
}


def _check_types(info: dict) -> None:
    assert set(info) == set(FIELDS)
    for name, kind in FIELDS.items():
        assert isinstance(info[name], kind), (name, info[name])


@pytest.mark.parametrize("name", READABLE)
def test_inspect_readable(name):
    data, fmt, mode, channels, bit_depth, frames, size = READABLE[name]
    info = inspect_bytes(data)
    _check_types(info)
    assert info["readable"] and info["reason"] == ""
    assert (info["format"], info["mode"]) == (fmt, mode)
    assert (info["channels"], info["bit_depth"], info["frames"]) == (channels, bit_depth, frames)
    assert (info["width"], info["height"]) == size
    assert info["exif_rotated"] is (name == "exif_rotated")
    for c in "rgb":
        assert 0.0 <= info[f"mean_{c}"] <= 1.0 and 0.0 <= info[f"std_{c}"] <= 1.0
    assert len(info["phash"]) == 16
    int(info["phash"], 16)


def test_inspect_channel_statistics():
    info = inspect_bytes(ib.encode(Image.new("RGB", (40, 40), (255, 0, 51)), "PNG"))
    assert (info["mean_r"], info["mean_g"], info["mean_b"]) == pytest.approx((1.0, 0.0, 0.2))
    assert (info["std_r"], info["std_g"], info["std_b"]) == pytest.approx((0.0, 0.0, 0.0), abs=1e-6)


def test_inspect_grey16_is_rescaled_not_clipped():
    # 16-bit values (mostly > 255) decode to the full 8-bit range, not to white
    info = inspect_bytes(ib.grey16(7))
    assert 0.3 < info["mean_r"] < 0.7 and info["std_r"] > 0.1


# --- inspect_bytes: files that are not images --------------------------------------------------------

UNREADABLE = {
    "text": (ib.TEXT, "not a readable image"),
    "html": (ib.HTML, "not a readable image"),
    "truncated_png": (ib.truncated(ib.png(11, (96, 80))), "not a readable image"),
    "truncated_jpeg": (ib.truncated(ib.jpeg(12, (96, 80))), "not a readable image"),
    "png_header_only": (ib.png(13)[:40], "not a readable image"),
    "bomb_20000x20000": (ib.bomb_png(20_000, 20_000), "oversized"),
    # over headstart's MAX_PIXELS but under twice Pillow's limit: headstart's own check refuses it
    "bomb_9000x9000": (ib.bomb_png(9_000, 9_000), "oversized"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", UNREADABLE)
def test_inspect_unreadable_never_raises(name):
    data, reason = UNREADABLE[name]
    info = inspect_bytes(data)
    _check_types(info)
    assert not info["readable"]
    assert info["reason"].startswith(reason), info["reason"]
    assert len(info["reason"]) <= 300
    assert (info["width"], info["height"], info["phash"]) == (0, 0, "")
    assert inspect_bytes(data) == info  # reproducible: the reason lands in manifests and reports


def test_inspect_empty_bytes():
    info = inspect_bytes(b"")
    _check_types(info)
    assert not info["readable"] and info["reason"] == "empty file"


# --- phash and hamming -----------------------------------------------------------------------------


def _distance(a: str, b: str) -> int:
    return int(hamming(np.array([int(a, 16)], np.uint64), np.array([int(b, 16)], np.uint64))[0, 0])


@pytest.mark.parametrize("seed", range(4))
def test_phash_survives_resize_and_jpeg(seed):
    original = ib.scene(seed, (96, 80))
    copy = ib.encode(original.resize((72, 60), Image.Resampling.BILINEAR), "JPEG", quality=90)
    a, b = inspect_bytes(ib.encode(original, "PNG"))["phash"], inspect_bytes(copy)["phash"]
    assert _distance(a, b) <= 2
    assert phash(original) == a  # inspection records the phash of the decoded RGB image


def test_phash_separates_unrelated_images():
    hashes = [phash(ib.noise(seed)) for seed in range(6)] + [phash(ib.scene(seed)) for seed in range(6)]
    h = np.array([int(x, 16) for x in hashes], np.uint64)
    d = hamming(h, h)
    off_diagonal = d[~np.eye(len(h), dtype=bool)]
    assert off_diagonal.min() > 10


def test_hamming_shape_and_values():
    a = np.array([0, 0xFF, 2**64 - 1], np.uint64)
    b = np.array([0, 1], np.uint64)
    d = hamming(a, b)
    assert d.shape == (3, 2) and d.dtype == np.int16
    np.testing.assert_array_equal(d, [[0, 1], [8, 7], [64, 63]])
    assert hamming(a[:0], b).shape == (0, 2)


# --- inspect_files and InspectionCache --------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    contents = {"a.png": ib.png(1), "b.jpg": ib.jpeg(2), "c.gif": ib.animated_gif(3), "bad.png": ib.TEXT}
    for name, data in contents.items():
        (d / name).write_bytes(data)
    (d / "empty.png").write_bytes(b"")
    return [d / n for n in [*contents, "empty.png"]]


@pytest.fixture
def decodes(monkeypatch):
    """Paths decoded by inspect_files (in this process: workers=1)."""
    seen: list[str] = []
    original = inspection._inspect_file

    def counting(path):
        seen.append(os.path.basename(path))
        return original(path)

    monkeypatch.setattr(inspection, "_inspect_file", counting)
    return seen


def test_inspect_files_rows(files, tmp_path):
    rows = inspect_files(files, InspectionCache(tmp_path / "cache"), workers=1)
    assert len(rows) == len(files)
    for path, row in zip(files, rows, strict=True):
        data = path.read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest() and row["bytes"] == len(data)
        assert {k: row[k] for k in FIELDS} == inspect_bytes(data)
    assert [r["readable"] for r in rows] == [True, True, True, False, False]
    assert rows[-1]["reason"] == "empty file"


def test_cache_second_run_decodes_nothing(files, tmp_path, decodes):
    first = inspect_files(files, InspectionCache(tmp_path / "cache"), workers=1)
    assert sorted(decodes) == ["a.png", "b.jpg", "bad.png", "c.gif"]  # the empty file is never decoded
    assert (tmp_path / "cache" / "inspection" / f"{inspection.inspection_key()}.parquet").is_file()

    decodes.clear()
    second = inspect_files(files, InspectionCache(tmp_path / "cache"), workers=1)  # a new run: read from disk
    assert decodes == []
    assert second == first
    for row in second:
        _check_types({k: row[k] for k in FIELDS})


def test_cache_reinspects_a_changed_file(files, tmp_path, decodes):
    inspect_files(files, InspectionCache(tmp_path / "cache"), workers=1)
    files[0].write_bytes(ib.png(99, (64, 50)))
    decodes.clear()
    rows = inspect_files(files, InspectionCache(tmp_path / "cache"), workers=1)
    assert decodes == ["a.png"]
    assert (rows[0]["width"], rows[0]["height"]) == (64, 50)
    # the old entry stays (another copy may still have that content) and the new one is added
    assert len(InspectionCache(tmp_path / "cache").entries) == 5


def test_cache_keyed_by_content_not_path(files, tmp_path, decodes):
    inspect_files(files, InspectionCache(tmp_path / "cache"), workers=1)
    moved = files[0].with_name("renamed.png")
    files[0].rename(moved)
    decodes.clear()
    rows = inspect_files([moved], InspectionCache(tmp_path / "cache"), workers=1)
    assert decodes == [] and rows[0]["readable"]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), id="truncated"),
        pytest.param(lambda p: p.write_bytes(b"not parquet"), id="garbage"),
        pytest.param(lambda p: pd.DataFrame({"sha256": ["x"]}).to_parquet(p), id="missing-fields"),
    ],
)
def test_damaged_cache_is_rebuilt_with_a_warning(files, tmp_path, decodes, caplog, damage):
    first = inspect_files(files, InspectionCache(tmp_path / "cache"), workers=1)
    path = InspectionCache(tmp_path / "cache").path
    damage(path)
    decodes.clear()
    with caplog.at_level(logging.WARNING, "headstart.data.inspection"):
        cache = InspectionCache(tmp_path / "cache")
    assert cache.entries == {} and path.name in caplog.text and "damaged" in caplog.text
    assert inspect_files(files, cache, workers=1) == first
    assert sorted(decodes) == ["a.png", "b.jpg", "bad.png", "c.gif"]
    assert len(InspectionCache(tmp_path / "cache").entries) == 4  # rewritten whole


def test_cache_key_follows_the_code_and_the_libraries(files, tmp_path, decodes, monkeypatch):
    from headstart import provenance

    inspect_files(files, InspectionCache(tmp_path / "cache"), workers=1)
    key = inspection.inspection_key()
    real_hash, real_version = provenance.code_hash, provenance.version
    with monkeypatch.context() as m:
        m.setattr(provenance, "code_hash", lambda *mods: real_hash(*mods) + "-edited")
        assert inspection.inspection_key() != key
        decodes.clear()
        inspect_files(files, InspectionCache(tmp_path / "cache"), workers=1)
        assert len(decodes) == 4  # edited inspection code: every file is inspected again
    with monkeypatch.context() as m:
        m.setattr(provenance, "version", lambda d: "99.0" if d == "pillow" else real_version(d))
        assert inspection.inspection_key() != key
    assert inspection.inspection_key() == key


def test_inspect_files_in_worker_processes(files, tmp_path):
    serial = inspect_files(files, InspectionCache(tmp_path / "serial"), workers=1)
    parallel = inspect_files(files, InspectionCache(tmp_path / "parallel"), workers=2)
    assert parallel == serial


def test_inspect_files_survives_what_cannot_be_read(tmp_path):
    # running as root, chmod 000 does not stop reads; a directory and a dangling link do
    (tmp_path / "a_dir.png").mkdir()
    links = [tmp_path / "a_dir.png"]
    try:
        os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
        links.append(tmp_path / "dangling.png")
    except OSError:
        pass
    rows = inspect_files(links, InspectionCache(tmp_path / "cache"), workers=1)
    for row in rows:
        assert not row["readable"] and row["reason"] == "cannot be read"
        assert row["sha256"] == "" and row["bytes"] == 0


def test_scan_lists_broken_symlink_without_crashing(tmp_path):
    from headstart.data.manifest import scan

    root = tmp_path / "data"
    for seed, label in enumerate(("cat", "dog")):
        (root / label).mkdir(parents=True)
        (root / label / "ok.png").write_bytes(ib.png(seed))
    try:
        os.symlink(tmp_path / "gone.png", root / "cat" / "dangling.png")
    except OSError:
        pytest.skip("symlinks not supported here")
    m = scan(root, [".png"], tmp_path / "cache").set_index("path")
    assert not m.at["cat/dangling.png", "readable"]
    assert m.at["cat/dangling.png", "reason"] == "broken link"
    assert m.loc[["cat/ok.png", "dog/ok.png"], "readable"].all()
