"""Few images of many classes: the split ledger through the prepare stage, and validation passing
for classes of a few images."""

from __future__ import annotations

import errno
import json

import pandas as pd
import pytest

from headstart.data.manifest import LEDGER
from tasks.prepare import prepare
from tasks.validate import validate
from tests.conftest import COLOURS, make_folder, make_image


def _splits(cfg) -> dict[str, str]:
    m = pd.read_parquet(cfg.stage_dir("prepare") / "manifest.parquet")
    return dict(zip(m["path"], m["split"], strict=True))


def test_prepare_keeps_the_ledger_beside_the_images_and_no_split_moves(tiny_params):
    cfg, data = tiny_params, tiny_params.prepare.data_dir
    first = prepare(cfg)
    ledger = (data / LEDGER).read_text()
    assert ledger.startswith("# headstart split ledger: seed=0 val_fraction=0.15 test_fraction=0.2\n")
    assert len(ledger.splitlines()) == 2 + 24 and "no split ledger yet" in first.ledger
    before = _splits(cfg)
    for step in range(3):
        for c, name in enumerate(("cat", "dog")):
            for i in range(3):
                make_image(
                    data / name / f"new{step}_{i}.png", COLOURS[c], seed=90_000 + 100 * step + 10 * c + i
                )
        again = prepare(cfg)
        after = _splits(cfg)
        assert {p: after[p] for p in before} == before and again.moved == []
        assert f"{len(before)} images keep their splits" in again.ledger
        assert again.n_images == 24 + 6 * (step + 1) and LEDGER not in "".join(after)  # never an image
        before = after
    report = json.loads((cfg.stage_dir("prepare") / "report.json").read_text())
    assert report["moved"] == [] and "ledger" not in report  # the same data, the same report


def test_a_data_folder_that_cannot_be_written_keeps_this_runs_splits(tiny_params, monkeypatch):
    import tasks.prepare as stage

    def refuse(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(stage, "write_text", refuse)
    result = prepare(tiny_params)
    assert "not written (Read-only file system)" in result.ledger
    assert not (tiny_params.prepare.data_dir / LEDGER).exists()
    assert set(_splits(tiny_params).values()) == {"train", "val", "test"}


@pytest.mark.parametrize("per_class", [5, 12])
def test_ten_classes_of_a_few_images_pass_validation(tmp_path, tiny_params, per_class):
    """The whole path (scan, ledger, Great Expectations) on 10 classes of 5 and of 12 real files."""
    data = tmp_path / "many"
    for c in range(10):
        colour = tuple(int(v) for v in ((37 * c) % 256, (91 * c) % 256, (151 * c) % 256))
        for i in range(per_class):
            make_image(data / f"class{c}" / f"{i}.png", colour, seed=1000 * c + i)
    cfg = tiny_params.model_copy(
        update={"prepare": tiny_params.prepare.model_copy(update={"data_dir": data})}
    )
    prepare(cfg)
    result = validate(cfg)
    assert result.success and result.n_images == 10 * per_class
    clean = pd.read_parquet(cfg.stage_dir("validate") / "manifest.parquet")
    assert all(set(g) == {"train", "val", "test"} for _, g in clean.groupby("label")["split"])


def test_a_class_under_min_per_class_is_refused_by_name(tmp_path, tiny_params):
    from headstart import HeadstartError

    data = make_folder(tmp_path / "few", per_class=6)
    for f in sorted((data / "dog").iterdir())[:2]:
        f.unlink()
    cfg = tiny_params.model_copy(
        update={"prepare": tiny_params.prepare.model_copy(update={"data_dir": data})}
    )
    prepare(cfg)
    with pytest.raises(HeadstartError, match=r"dog/all: 4 images \(min 5\)"):
        validate(cfg)
