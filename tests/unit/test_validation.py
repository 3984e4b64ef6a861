"""headstart.validation: bad input it must survive, each file quarantined or named by an expectation."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from PIL import Image

from headstart.config import PrepareParams, ValidateLevels, ValidateParams, load_params
from headstart.data.manifest import assign_splits, scan
from headstart.validation import failure_message, to_markdown, validate_manifest
from tests.conftest import COLOURS, make_folder, make_image
from tests.unit import imagebytes as ib

EXTS = PrepareParams().extensions
RELAXED = {"train": 1, "val": 0, "test": 0}  # for tests that are not about counts per split


def _prepare(root: Path, tmp_path: Path, seed: int = 0, kept: dict | None = None) -> pd.DataFrame:
    """What tasks/prepare.py does: scan, then split the readable rows (split '' for the rest), the
    images in `kept` (the split ledger) keeping theirs."""
    m = scan(root, EXTS, tmp_path / "cache")
    ok = m["readable"]
    m["split"] = ""
    m.loc[ok, "split"] = assign_splits(m[ok], 0.15, 0.2, seed, kept)
    return m


def _params(**kwargs) -> ValidateParams:
    return ValidateParams(**{"min_per_class": 1, "min_per_split": RELAXED, **kwargs})


def _check(report: dict, name: str) -> dict:
    (entry,) = [r for r in report["expectations"] if r["name"] == name]
    return entry


def _failed(report: dict) -> set[str]:
    return {r["name"] for r in report["expectations"] if not r["success"]}


def _link(target: Path, link: Path) -> None:
    try:
        os.symlink(target, link)
    except OSError:
        pytest.skip("symlinks not supported here")


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: a file's sha256, a link's target (never followed), or 'dir'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "link -> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --- one folder with every kind of bad input, validated once ---------------------------------------

BAD = {  # path: start of its quarantine reason
    "cat/empty.jpg": "empty file",
    "cat/truncated.jpg": "not a readable image",
    "dog/truncated.png": "not a readable image",
    "cat/notes.jpg": "not a readable image",  # a text file with an image's name
    "dog/page.png": "not a readable image",  # an HTML error page saved as .png
    "dog/dot.png": "size 1x1 outside validate.min_size..max_size",
    "cat/bomb.png": "oversized",
    "cat/outside.png": "resolves outside the data folder",
    "dog/dangling.jpg": "broken link",
    "README.txt": "not in a class folder",
    "dog/Thumbs.db": "extension .db not in prepare.extensions",
    "cat/twin.png": "same content in another class: dog/twin.png",
    "dog/twin.png": "same content in another class: cat/twin.png",
}
USABLE = {  # path: content
    "cat/grey16.png": ib.grey16(40),
    "dog/cmyk.jpg": ib.cmyk_jpeg(41),
    "cat/palette.png": ib.palette_transparent(42),
    "dog/rgba.png": ib.rgba(43),
    "cat/grey.png": ib.grey(44),
    "dog/animated.gif": ib.animated_gif(45),
    "cat/rotated.jpg": ib.exif_rotated_jpeg(50),
    "cat/chat noir é 猫.png": ib.png(51),
    "dog/my dog (1).JPEG": ib.jpeg(52),
    "dog/sub folder/nested.png": ib.png(53),
}
ZOO_WARNINGS = {
    "every_file_is_a_readable_image",
    "no_empty_files",
    "paths_inside_data_root",
    "width_in_bounds",
    "height_in_bounds",
    "no_duplicates_across_classes",
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zoo")
    root = make_folder(tmp / "data", per_class=8)
    contents = {
        "cat/empty.jpg": b"",
        "cat/truncated.jpg": ib.truncated(ib.jpeg(20, (96, 80))),
        "dog/truncated.png": ib.truncated(ib.png(21, (96, 80))),
        "cat/notes.jpg": ib.TEXT,
        "dog/page.png": ib.HTML,
        "dog/dot.png": ib.encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "cat/bomb.png": ib.bomb_png(),
        "README.txt": b"my photos",
        ".DS_Store": b"\0\0\0\1Bud1" + bytes(100),
        "cat/.DS_Store": b"\0\0\0\1Bud1" + bytes(100),
        "dog/Thumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100),
        "cat/twin.png": ib.png(30),
        "dog/twin.png": ib.png(30),
        **USABLE,
    }
    for rel, data in contents.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "owl").mkdir()  # an empty class folder
    target = tmp / "elsewhere" / "secret.png"
    target.parent.mkdir()
    target.write_bytes(ib.png(60))
    _link(target, root / "cat" / "outside.png")
    _link(tmp / "gone.jpg", root / "dog" / "dangling.jpg")

    before = _snapshot(root)
    target_before = target.read_bytes()
    manifest = _prepare(root, tmp)
    v = validate_manifest(manifest, _params(), docs_dir=tmp / "docs")
    return SimpleNamespace(
        root=root,
        tmp=tmp,
        target=target,
        manifest=manifest,
        v=v,
        unchanged=before == _snapshot(root) and target.read_bytes() == target_before,
        quarantined=dict(zip(v.quarantine["path"], v.quarantine["reason"], strict=True)),
    )


def test_zoo_survives_and_only_warns(zoo):
    r = zoo.v.report
    assert r["success"] and r["failed"] == []
    assert set(r["warnings"]) == ZOO_WARNINGS
    assert _failed(r) == ZOO_WARNINGS
    assert r["n_files"] == len(zoo.manifest) == 16 + len(BAD) + len(USABLE)
    assert not zoo.manifest["path"].str.contains("DS_Store").any()  # hidden files are ignored
    assert r["n_images"] == len(zoo.v.clean) == 16 + len(USABLE)
    assert r["n_quarantined"] == len(zoo.v.quarantine) == len(BAD)


@pytest.mark.parametrize("path", BAD)
def test_bad_file_is_quarantined_with_reason(zoo, path):
    assert path in zoo.quarantined, path
    assert zoo.quarantined[path].startswith(BAD[path]), zoo.quarantined[path]
    assert path not in set(zoo.v.clean["path"])


@pytest.mark.parametrize("path", USABLE)
def test_awkward_but_valid_file_is_usable(zoo, path):
    assert path not in zoo.quarantined
    row = zoo.v.clean.set_index("path").loc[path]
    assert row["readable"] and row["split"] in ("train", "val", "test")
    assert row["width"] >= 32 and row["height"] >= 32


def test_usable_files_recorded_as_what_they_are(zoo):
    rows = zoo.v.clean.set_index("path")
    assert rows.at["cat/grey16.png", "mode"] == "I;16" and rows.at["cat/grey16.png", "bit_depth"] == 16
    assert rows.at["dog/cmyk.jpg", "mode"] == "CMYK" and rows.at["dog/cmyk.jpg", "channels"] == 4
    assert rows.at["cat/palette.png", "mode"] == "P"
    assert rows.at["dog/rgba.png", "mode"] == "RGBA"
    assert rows.at["cat/grey.png", "mode"] == "L"
    assert (rows.at["dog/animated.gif", "format"], rows.at["dog/animated.gif", "frames"]) == ("GIF", 3)
    rotated = rows.loc["cat/rotated.jpg"]
    assert rotated["exif_rotated"] and (rotated["width"], rotated["height"]) == (40, 48)
    assert rows.at["dog/sub folder/nested.png", "label"] == "dog"


def test_expectations_name_the_bad_files(zoo):
    r = zoo.v.report
    assert _check(r, "no_empty_files")["examples"] == ["cat/empty.jpg"]
    assert _check(r, "paths_inside_data_root")["examples"] == ["cat/outside.png"]
    assert _check(r, "width_in_bounds")["examples"] == ["dog/dot.png"]
    assert _check(r, "height_in_bounds")["level"] == "warn"
    unreadable = _check(r, "every_file_is_a_readable_image")
    assert unreadable["count"] == len(BAD) - 3  # all but the tiny image and the two twins
    assert len(unreadable["examples"]) == ValidateParams().max_examples
    twins = _check(r, "no_duplicates_across_classes")
    assert twins["count"] == 2 and twins["level"] == "warn"
    assert set(twins["examples"]) == {"cat/twin.png ~ dog/twin.png", "dog/twin.png ~ cat/twin.png"}
    for name in ("format_allowed", "mode_allowed", "enough_classes", "min_per_class_per_split"):
        assert _check(r, name)["success"], name


def test_symlink_out_of_root_is_never_read(zoo):
    sha = hashlib.sha256(zoo.target.read_bytes()).hexdigest()
    assert sha not in set(zoo.manifest["sha256"])
    row = zoo.manifest.set_index("path").loc["cat/outside.png"]
    assert not row["readable"] and row["sha256"] == "" and row["split"] == ""


def test_empty_class_folder_has_no_effect(zoo):
    assert set(zoo.v.clean["label"]) == {"cat", "dog"}
    assert _check(zoo.v.report, "enough_classes")["observed"] == 2
    assert not any(p.startswith("owl/") for p in zoo.manifest["path"])


def test_data_folder_is_unchanged(zoo):
    assert zoo.unchanged
    assert not (zoo.root / "cache").exists() and not (zoo.root / "docs").exists()


def test_data_docs_are_built(zoo):
    index = zoo.tmp / "docs" / "index.html"
    assert index.is_file() and index.stat().st_size > 0
    assert list((zoo.tmp / "docs").rglob("*.html")) != [index]  # the validation pages too


def test_clean_and_quarantine_partition_the_files(zoo):
    clean, quarantined = set(zoo.v.clean["path"]), set(zoo.quarantined)
    assert clean.isdisjoint(quarantined)
    assert clean | quarantined == set(zoo.manifest["path"])
    assert list(zoo.v.clean.columns) == list(zoo.manifest.columns)
    assert zoo.v.clean["readable"].all()
    assert list(zoo.v.quarantine.columns) == ["path", "reason"]


def test_report_is_json(zoo):
    text = json.dumps(zoo.v.report)
    assert json.loads(text)["n_images"] == zoo.v.report["n_images"]


def test_markdown_lists_every_expectation(zoo):
    md = to_markdown(zoo.v.report)
    assert md.startswith("# Data validation passed")
    names = [r["name"] for r in zoo.v.report["expectations"]]
    assert sorted(names) == sorted(n for n in ValidateLevels.model_fields if n != "labels_as_declared")
    for name in names:
        assert f"| {name} |" in md, name
    # one table row per expectation: cells never spill into extra columns
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == len(names) + 1


# --- scenarios, each in its own small folder -------------------------------------------------------


def test_one_class_only(tmp_path):
    root = make_folder(tmp_path / "data", per_class=8, classes=("cat",))
    m = _prepare(root, tmp_path)
    v = validate_manifest(m, _params(), docs_dir=None)
    assert not v.report["success"] and v.report["failed"] == ["enough_classes"]
    assert _check(v.report, "enough_classes")["observed"] == 1
    assert "enough_classes" in failure_message(v.report, tmp_path / "report.json")
    # a nested override turns it into a warning
    p = load_params(
        None,
        [
            "validate.levels.enough_classes=warn",
            "validate.min_per_class=1",
            f"validate.min_per_split={RELAXED}",
        ],
    )
    v = validate_manifest(m, p.validate, docs_dir=None)
    assert v.report["success"] and "enough_classes" in v.report["warnings"]


def test_empty_class_folder_leaving_one_class(tmp_path):
    root = make_folder(tmp_path / "data", per_class=8, classes=("cat",))
    (root / "dog").mkdir()
    v = validate_manifest(_prepare(root, tmp_path), _params(), docs_dir=None)
    assert v.report["failed"] == ["enough_classes"]


def test_nothing_usable_at_all(tmp_path):
    root = tmp_path / "data"
    for label, data in (("cat", ib.TEXT), ("dog", b"")):
        (root / label).mkdir(parents=True)
        (root / label / "x.png").write_bytes(data)
    v = validate_manifest(_prepare(root, tmp_path), _params(), docs_dir=None)
    assert v.clean.empty and len(v.quarantine) == 2
    assert not v.report["success"] and "enough_classes" in v.report["failed"]
    json.dumps(v.report)


def test_too_few_images_per_class_and_per_split(tmp_path):
    """The class as a whole against validate.min_per_class, each split against min_per_split: the
    splits are prepare's, so a hand-made manifest that leaves a split empty still fails by name."""
    root = make_folder(tmp_path / "data", per_class=4)
    m = _prepare(root, tmp_path)
    m.loc[m["label"] == "dog", "split"] = "train"  # as no rule of prepare's would leave it
    v = validate_manifest(m, ValidateParams(), docs_dir=None)
    assert not v.report["success"] and v.report["failed"] == ["min_per_class_per_split"]
    check = _check(v.report, "min_per_class_per_split")
    assert check["count"] == 3  # cat/all, dog/all (4 < 5), dog/test
    assert sorted(e.split(":")[0] for e in check["examples"]) == ["cat/all", "dog/all", "dog/test"]
    assert "dog/all: 4 images (min 5)" in check["examples"]
    message = failure_message(v.report, tmp_path / "report.json")
    assert "min_per_class_per_split: 3 unexpected" in message and "dog/test: 0 images (min 1)" in message


def test_imbalance(tmp_path):
    root = tmp_path / "data"
    for i in range(40):
        make_image(root / "cat" / f"{i:03d}.png", COLOURS[0], seed=i)
    for i in range(10):
        make_image(root / "dog" / f"{i:03d}.png", COLOURS[1], seed=100 + i)
    m = _prepare(root, tmp_path)
    v = validate_manifest(m, _params(), docs_dir=None)
    assert v.report["success"] and v.report["warnings"] == ["imbalance_below_warn_ratio"]
    assert _check(v.report, "imbalance_below_warn_ratio")["examples"] == [
        "dog: 10 images (largest class / this = 4.0)"
    ]
    v = validate_manifest(m, _params(imbalance_fail_ratio=2.0), docs_dir=None)
    assert not v.report["success"] and v.report["failed"] == ["imbalance_below_fail_ratio"]


def test_labels_as_declared(tmp_path):
    root = make_folder(tmp_path / "data", per_class=6, classes=("cat", "owl"))
    m = _prepare(root, tmp_path)
    v = validate_manifest(m, _params(classes=["cat", "dog"]), docs_dir=None)
    assert not v.report["success"] and v.report["failed"] == ["labels_as_declared"]
    assert "labels_as_declared" in failure_message(v.report, tmp_path / "r.json")
    assert "| labels_as_declared | fail | FAILED |" in to_markdown(v.report)
    assert validate_manifest(m, _params(classes=["owl", "cat"]), docs_dir=None).report["success"]


def test_near_duplicate_across_splits(tmp_path):
    root = make_folder(tmp_path / "data", per_class=8)
    original = ib.scene(7, (96, 80))
    original.save(root / "cat" / "scene.png")
    original.save(root / "cat" / "scene_copy.jpg", quality=90)  # re-encoded: other bytes, same picture
    for seed in range(50):
        m = _prepare(root, tmp_path, seed=seed)
        split = dict(zip(m["path"], m["split"], strict=True))
        if split["cat/scene.png"] != split["cat/scene_copy.jpg"]:
            break
    else:
        pytest.fail("no seed put the two copies in different splits")

    v = validate_manifest(m, _params(), docs_dir=None)
    assert v.report["success"] and v.report["warnings"] == ["no_near_duplicates_across_splits"]
    check = _check(v.report, "no_near_duplicates_across_splits")
    pair = {"cat/scene.png ~ cat/scene_copy.jpg", "cat/scene_copy.jpg ~ cat/scene.png"}
    assert check["count"] == 2 and set(check["examples"]) == pair
    assert v.quarantine.empty  # near-duplicates are reported, not quarantined

    strict = _params(levels=ValidateLevels(no_near_duplicates_across_splits="fail"))
    v = validate_manifest(m, strict, docs_dir=None)
    assert not v.report["success"] and v.report["failed"] == ["no_near_duplicates_across_splits"]
    message = failure_message(v.report, tmp_path / "report.json")
    assert "no_near_duplicates_across_splits: 2 unexpected" in message and "cat/scene.png" in message


def test_near_duplicate_across_classes(tmp_path):
    root = make_folder(tmp_path / "data", per_class=8)
    original = ib.scene(8, (96, 80))
    original.save(root / "cat" / "scene.png")
    original.resize((80, 66)).save(root / "dog" / "scene_small.jpg", quality=90)
    v = validate_manifest(_prepare(root, tmp_path), _params(), docs_dir=None)
    check = _check(v.report, "no_near_duplicates_across_classes")
    assert not check["success"] and check["count"] == 2
    assert "cat/scene.png ~ dog/scene_small.jpg" in check["examples"]
    assert v.report["success"] and v.quarantine.empty


def test_exact_duplicate_across_splits_fails(tmp_path):
    # prepare splits by content, so only an edited manifest can do this; validation still guards it
    root = make_folder(tmp_path / "data", per_class=8)
    shutil.copy(root / "cat" / "cat_000.png", root / "cat" / "copy.png")
    m = _prepare(root, tmp_path)
    i = m.index[m["path"] == "cat/copy.png"][0]
    m.loc[i, "split"] = "test" if m.loc[i, "split"] != "test" else "train"
    v = validate_manifest(m, _params(), docs_dir=None)
    assert not v.report["success"] and v.report["failed"] == ["no_duplicates_across_splits"]
    assert "cat/copy.png ~ cat/cat_000.png" in _check(v.report, "no_duplicates_across_splits")["examples"]


def test_format_and_mode_not_allowed(tmp_path):
    root = make_folder(tmp_path / "data", per_class=8)
    (root / "cat" / "photo.jpg").write_bytes(ib.jpeg(70))
    (root / "dog" / "grey.png").write_bytes(ib.grey(72))
    params = _params(formats=["PNG"], modes=["RGB"])
    v = validate_manifest(_prepare(root, tmp_path), params, docs_dir=None)
    reasons = dict(zip(v.quarantine["path"], v.quarantine["reason"], strict=True))
    assert reasons == {
        "cat/photo.jpg": "format JPEG not in validate.formats",
        "dog/grey.png": "mode L not in validate.modes",
    }
    assert _check(v.report, "format_allowed")["examples"] == ["cat/photo.jpg"]
    assert _check(v.report, "mode_allowed")["examples"] == ["dog/grey.png"]
    assert v.report["success"]


def test_labels_as_declared_message_names_the_labels(tmp_path):
    root = make_folder(tmp_path / "data", per_class=6, classes=("cat", "owl"))
    v = validate_manifest(_prepare(root, tmp_path), _params(classes=["cat", "dog"]), docs_dir=None)
    message = failure_message(v.report, tmp_path / "r.json")
    assert "owl" in message and "dog" in message


def test_quarantining_a_class_s_only_val_image_moves_no_other_image(tmp_path):
    root = make_folder(tmp_path / "data", per_class=8)
    before = _prepare(root, tmp_path)
    vals = before[(before["label"] == "cat") & (before["split"] == "val")]
    assert len(vals) == 1
    only = vals["path"].iloc[0]
    shutil.copy(root / only, root / "dog" / "copy_of_cat.png")  # now a label conflict: quarantined
    params = ValidateParams(min_per_class=1, min_per_split={"train": 1, "val": 1, "test": 1})
    ledger = dict(zip(before["sha256"], before["split"], strict=True))
    v = validate_manifest(_prepare(root, tmp_path, kept=ledger), params, docs_dir=None)
    assert "min_per_class_per_split" in v.report["failed"]
    assert "cat/val: 0 images (min 1)" in _check(v.report, "min_per_class_per_split")["examples"]
    kept = dict(zip(before["path"], before["split"], strict=True))
    assert only not in set(v.clean["path"])
    assert all(kept[p] == s for p, s in zip(v.clean["path"], v.clean["split"], strict=True))


def test_8x8_images_pass_prepare_and_validate_with_default_params(tmp_path):
    """scikit-learn's digits, 8x8 grey: data for the domain verdict and the scratch path, not errors."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path / "digits"
    for label in (0, 1, 7):
        for i, img in enumerate(digits.images[digits.target == label][:20]):
            (root / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray((img * 255 / 16).astype("uint8"), "L").save(root / str(label) / f"{i:02d}.png")
    defaults = load_params(None, [])
    m = _prepare(root, tmp_path)
    assert (defaults.prepare.val_fraction, defaults.prepare.test_fraction) == (0.15, 0.2)  # as _prepare
    v = validate_manifest(m, defaults.validate, docs_dir=None)
    assert v.report["success"] and v.report["failed"] == [], v.report["failed"]
    assert v.quarantine.empty and len(v.clean) == 60
    assert {"width_in_bounds", "height_in_bounds"}.isdisjoint(_failed(v.report))
