"""The run report (headstart.report) on hand-made stage outputs: every section by id, nothing from the
network, escaping, placeholders, a failed run, a single class, no test images, and its size bounds."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headstart.config import load_params
from headstart.report import LIMITS, SECTIONS
from headstart.validation import DUPLICATE_FLAGS
from tasks.report import recorded_failure, report
from tests.conftest import COLOURS, make_image, write_params

HOSTILE = "<b>&\"x'.png"
NON_ASCII = "é夜.png"


class Page(HTMLParser):
    """What a browser would see: section ids, img sources, link targets, the text."""

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.srcs, self.hrefs, self.text = [], [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.ids.append(a.get("id"))
        for key, bucket in (("src", self.srcs), ("href", self.hrefs)):
            if key in a:
                bucket.append(a[key])

    def handle_data(self, data):
        self.text.append(data)

    def section(self, sid: str, full: str) -> str:
        """The raw HTML of one section."""
        return re.search(rf'<section id="{sid}">(.*?)</section>', full, re.S).group(1)


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, pd.DataFrame):
        obj.to_parquet(path, index=False) if path.suffix == ".parquet" else obj.to_csv(path, index=False)
    else:
        path.write_text(json.dumps(obj))


def fake_run(
    root: Path,
    classes=("cat", "dog"),
    n_per_class: int = 6,
    with_test: bool = True,
    extra_files: int = 0,
    real_images: int = 6,
) -> Path:
    """Stage outputs as the stages write them, over a data folder of tiny images (the first
    `real_images` per class exist; the rest are only manifest rows), plus HOSTILE and NON_ASCII."""
    art, data = root / "artifacts", root / "data"
    rows = []
    rng = np.random.default_rng(0)
    for c, label in enumerate(classes):
        names = [f"{label}_{i:05d}.png" for i in range(n_per_class + extra_files)]
        names[:2] = [HOSTILE, NON_ASCII] if c == 0 else names[:2]
        for i, name in enumerate(names):
            split = ("train", "val", "test")[i % 3] if with_test else ("train", "val")[i % 2]
            path = f"{label}/{name}"
            if i < real_images:
                make_image(data / path, COLOURS[c], seed=100 * c + i)
            phash = f"{int(rng.integers(0, 2**62)):016x}"
            rows.append(
                dict(
                    path=path,
                    label=label,
                    split=split,
                    sha256=f"{c}-{i}",
                    readable=True,
                    reason="",
                    phash=phash,
                )
            )
    (data / classes[0]).mkdir(parents=True, exist_ok=True)
    (data / classes[0] / "broken.png").write_bytes(b"not an image")
    rows.append(
        dict(
            path=f"{classes[0]}/broken.png",
            label=classes[0],
            split="",
            sha256="b",
            readable=False,
            reason="not a readable image: cannot identify",
            phash="",
        )
    )
    manifest = pd.DataFrame(rows)
    manifest.loc[1, "phash"] = manifest.loc[
        n_per_class + extra_files, "phash"
    ]  # a cross-class near-duplicate
    clean = manifest[manifest["readable"]]
    counts = {
        s: clean[clean["split"] == s].groupby("label").size().to_dict() for s in ("train", "val", "test")
    }
    _write(art / "prepare" / "manifest.parquet", manifest)
    _write(
        art / "prepare" / "report.json",
        {
            "classes": list(classes),
            "split_counts": counts,
            "n_files": len(manifest),
            "n_images": len(clean),
            "n_unreadable": 1,
            "data_hash": "ab" * 32,
            "data_dir": str(data),
        },
    )
    _write(art / "validate" / "manifest.parquet", clean)
    quarantined = manifest[~manifest["readable"]][["path", "reason"]]
    _write(
        art / "validate" / "quarantine.csv", pd.concat([quarantined, clean[["path"]].assign(reason="mode P")])
    )
    _write(
        art / "validate" / "report.json",
        {
            "success": True,
            "failed": [],
            "n_files": len(manifest),
            "n_images": len(clean),
            "n_quarantined": 1,
            "expectations": [
                {
                    "name": "every_file_is_a_readable_image",
                    "level": "warn",
                    "success": False,
                    "count": 1,
                    "examples": [HOSTILE],
                },
                *[
                    {"name": n, "level": "warn", "success": n != "no_near_duplicates_across_classes"}
                    | {"count": int(n == "no_near_duplicates_across_classes"), "examples": []}
                    for n in DUPLICATE_FLAGS
                ],
            ],
        },
    )
    (art / "validate" / "data_docs").mkdir()
    (art / "validate" / "data_docs" / "index.html").write_text("<html></html>")
    _write(
        art / "backbone" / "decision.json",
        {"chosen": "tiny", "how": "fixed", "reason": "fixed", "candidates": []},
    )
    paths = list(clean["path"])
    _write(
        art / "domain" / "report.json",
        {
            "verdict": "shifted",
            "score": 0.9,
            "thresholds": {},
            "furthest": [{"path": p, "divergence": 1.0} for p in paths[:40]],
        },
    )
    (art / "domain" / "profile.png").write_bytes(_png())
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_accuracy": 0.5 + e / 20}
        for e in (1, 2, 3)
    ]
    _write(art / "train_head" / "history.json", history)
    _write(art / "train_head" / "metrics.json", {"n_train": 4, "best_epoch": 3, "epochs_run": 3})
    _write(art / "finetune" / "decision.json", {"finetuned": False, "reason": "too few", "gate": {"n": 4}})
    _write(art / "scratch" / "decision.json", {"ran": False, "reason": "transfer fits"})
    _write(
        art / "select" / "decision.json",
        {
            "chosen": "transfer",
            "kind": "head",
            "reason": "only one",
            "candidates": [{"name": "transfer", "val_accuracy": 0.9}],
        },
    )
    _write(art / "calibrate" / "abstention.json", {"rule": {"temperature": 1.2}, "report": {"n": 4}})
    test = clean[clean["split"] == "test"]
    wrong = [classes[-1] if label == classes[0] else classes[0] for label in test["label"]]
    _write(
        art / "evaluate" / "predictions.csv",
        pd.DataFrame(
            {
                "path": test["path"],
                "actual": test["label"],
                "predicted": wrong,
                "confidence": 0.75,
                "abstained": "ambiguous",
            }
        ),
    )
    _write(art / "evaluate" / "metrics.json", {"accuracy": 0.0, "n": len(test), "per_class": {}})
    (art / "evaluate" / "confusion.png").write_bytes(_png())
    _write(
        art / "export" / "parity.json",
        {
            "passed": True,
            "registered": ["fp32"],
            "variants": {"fp32": {"passed": True, "top1_agreement": 1.0}},
        },
    )
    _write(art / "register" / "run.json", {"run_id": "r1", "model_uri": "models:/m/1"})
    _write(
        art / "promote" / "decision.json",
        {
            "promoted": True,
            "version": "1",
            "reason": "first",
            "gates": {"domain": {"passed": True, "detail": "ok"}},
        },
    )
    return root


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    return buf.getvalue()


def _dirs(root: Path) -> dict[str, Path]:
    return {
        "project.artifacts_dir": root / "artifacts",
        "prepare.data_dir": root / "data",
        "project.cache_dir": root / "cache",
    }


def _cfg(root: Path):
    return load_params(None, [f"{k}={v}" for k, v in _dirs(root).items()])


def _page(root: Path, **kw) -> tuple[str, Page]:
    r = report(_cfg(root), log=False, **kw)
    text = Path(r.path).read_text(encoding="utf-8")
    return text, Page(text)


def test_every_section_is_present_self_contained_and_offline(tmp_path):
    text, page = _page(fake_run(tmp_path))
    assert page.ids == [sid for sid, _, _ in SECTIONS]
    assert page.srcs and all(s.startswith("data:image/") for s in page.srcs)
    assert all(not h.startswith(("http:", "https:", "//", "file:")) for h in page.hrefs)
    assert "../validate/data_docs/index.html" in page.hrefs and "../validate/quarantine.csv" in page.hrefs
    assert not re.search(r"<(script|link)\b", text)  # no code and no stylesheet to fetch
    assert 'class="skip">not run' not in text  # every stage's outputs were there
    dup = page.section("duplicates", text)
    assert "different classes" in dup and dup.count("<img") == 2  # the pair, side by side


def _no_duplicates(root: Path) -> Path:
    """Validation's report says it found no duplicates."""
    rep = json.loads((root / "artifacts" / "validate" / "report.json").read_text())
    for e in rep["expectations"]:
        e["count"] = 0
    _write(root / "artifacts" / "validate" / "report.json", rep)
    return root


def test_no_duplicate_pass_when_validation_found_none(tmp_path, monkeypatch):
    import headstart.validation

    root = _no_duplicates(fake_run(tmp_path))
    monkeypatch.setattr(headstart.validation, "flag_files", None)  # called: a TypeError
    text, page = _page(root)
    assert "Validation found no exact or near-duplicate" in page.section("duplicates", text)


def test_names_with_html_characters_and_non_ascii_are_escaped_and_shown(tmp_path):
    text, page = _page(fake_run(tmp_path))
    assert HOSTILE not in text and "<b>&" not in text  # never raw in the markup
    shown = "".join(page.text)
    assert f"cat/{HOSTILE}" in shown and f"cat/{NON_ASCII}" in shown  # read back as the names they are
    assert sum(alt.startswith("data:") for alt in page.srcs) >= 2


def test_an_undecodable_image_is_a_placeholder_with_its_reason(tmp_path):
    root = fake_run(tmp_path)
    test = pd.read_csv(root / "artifacts" / "evaluate" / "predictions.csv")
    (root / "data" / test["path"][0]).write_bytes(b"\x89PNG truncated")  # decoded now: it fails now
    text, _ = _page(root)
    quarantine = Page(text).section("quarantine", text)
    assert "cannot show: not a readable image: cannot identify" in quarantine  # prepare's reason, not re-read
    assert "cannot show: UnidentifiedImageError" in Page(text).section("test", text)


def test_a_failed_run_is_headed_by_why_and_hides_later_outputs(tmp_path):
    root = fake_run(tmp_path)
    cfg = _cfg(root)
    error = "train_head: <lr> & too high"
    text, page = _page(root, failed="train_head", error=error)
    assert page.ids[0] == "failure" and error in "".join(page.text)
    assert "<lr>" not in text
    for sid in ("finetune", "test", "export", "promotion"):  # an earlier run's files are not this run's
        assert "not run: the run stopped at stage train_head" in page.section(sid, text)
    assert "stage train_head failed" in page.section("training", text)
    assert "Verdict: shifted" in page.section("domain", text)  # before it: shown
    assert recorded_failure(cfg) == ("train_head", error)  # `headstart report` rebuilds it alike
    report(cfg, log=False)  # a later success drops the failure
    assert recorded_failure(cfg) == (None, None)


def test_a_gate_that_refused_shows_its_failed_report(tmp_path):
    root = fake_run(tmp_path)
    refused = {
        "success": False,
        "failed": ["min_per_class_per_split"],
        "n_files": 1,
        "n_images": 1,
        "expectations": [],
    }
    _write(root / "artifacts" / "validate" / "failed" / "report.json", refused)
    text, page = _page(root, failed="validate", error="data validation failed")
    assert "FAILED: min_per_class_per_split" in page.section("validation", text)


def test_a_single_class_without_test_images_says_so(tmp_path):
    root = fake_run(tmp_path, classes=("cat",), with_test=False)
    for stage in ("validate", "backbone", "domain", "evaluate"):
        for f in (root / "artifacts" / stage).glob("*.*"):
            f.unlink()
    text, page = _page(root, failed="validate", error="enough_classes: found 1 class (cat)")
    data = page.section("data", text)
    assert "Only 1 class (cat)" in data and "No test images" in data
    assert "not run: the run stopped at stage validate" in page.section("test", text)


def test_a_damaged_output_is_named_in_its_section(tmp_path):
    root = fake_run(tmp_path)
    (root / "artifacts" / "export" / "parity.json").write_text("{trunc")
    text, page = _page(root)
    assert "parity.json is unreadable (JSONDecodeError" in page.section("export", text)
    assert page.ids == [sid for sid, _, _ in SECTIONS]


def test_ten_thousand_images_make_a_bounded_page(tmp_path):
    # validation's duplicate pass is as slow as validation's (seconds); a report with pairs draws
    # at most LIMITS["pairs"] of them
    root = _no_duplicates(fake_run(tmp_path, classes=("a", "b", "c", "d"), n_per_class=2500, real_images=30))
    r = report(_cfg(root), log=False)
    text = Path(r.path).read_text(encoding="utf-8")
    page = Page(text)
    assert r.bytes < 1_500_000, r.bytes  # 10,000 rows in, a page of bounded size out
    assert page.section("quarantine", text).count("<figure") == LIMITS["quarantine"]
    assert page.section("test", text).count("<figure") == LIMITS["misclassified"]
    assert page.section("abstention", text).count("<figure") == LIMITS["abstained"]
    assert page.section("domain", text).count("<figure") == LIMITS["furthest"]
    assert re.search(r"\d+ more not shown", page.section("test", text))


def test_the_report_stage_is_last_and_reads_what_it_shows():
    from headstart.stages import NAMES, get

    stage = get("report")
    assert NAMES[-1] == "report" and stage.reads_data
    assert {"validate/quarantine.csv", "evaluate/predictions.csv", "domain/profile.png"} <= set(stage.deps)


@pytest.mark.parametrize("name", ["index.html", "summary.md"])
def test_the_report_folder_holds_the_page_and_the_prefect_summary(tmp_path, name):
    root = fake_run(tmp_path, n_per_class=3, real_images=3)
    report(_cfg(root), log=False)
    assert (root / "artifacts" / "report" / name).stat().st_size > 0


def test_headstart_report_rebuilds_the_page_and_keeps_a_recorded_failure(tmp_path, capsys):
    from headstart.cli import main

    root = fake_run(tmp_path, n_per_class=3, real_images=3)
    report(_cfg(root), failed="export", error="parity failed", log=False)
    params = write_params(root / "params.yaml", [f"{k}={v}" for k, v in _dirs(root).items()])
    assert main(["report", "--params", str(params)]) == 0
    page = root / "artifacts" / "report" / "index.html"
    assert f"headstart report: {page}" in capsys.readouterr().out
    assert "Failed at stage export" in page.read_text(encoding="utf-8")


@pytest.mark.browser
@pytest.mark.slow
def test_the_report_opened_offline_in_chromium_shows_every_section_and_image(tmp_path, capsys):
    """As a person would look at it: `headstart report --screenshot` renders the page in headless
    Chromium; nothing leaves the machine, every section is visible, every thumbnail loads."""
    from PIL import Image

    from headstart.browser import render
    from headstart.cli import main

    root = fake_run(tmp_path, n_per_class=3, real_images=3)
    params = write_params(root / "params.yaml", [f"{k}={v}" for k, v in _dirs(root).items()])
    shot = tmp_path / "shot.png"
    assert main(["report", "--params", str(params), "--screenshot", str(shot), "--width", "900"]) == 0
    assert "0 problems" in capsys.readouterr().out
    page = root / "artifacts" / "report" / "index.html"
    r = render(page, query="section[id] > h2")
    assert r.external == [] and r.failed == [] and r.page_errors == []
    assert len(r.matches) == len(SECTIONS)  # every section's heading is visible
    assert r.images and r.broken_images == []
    with Image.open(shot) as im:
        assert im.width == 900 and im.height > 800  # the whole page, not the viewport
        assert np.asarray(im.convert("L")).std() > 10  # not a blank page


def test_a_screenshot_that_loads_something_external_fails_the_command(tmp_path, monkeypatch, capsys):
    from headstart import browser, cli

    class Shot:
        images, requests, external, broken_images = (
            ["a"],
            ["file:///x", "https://cdn/x.js"],
            ["https://cdn/x.js"],
            [],
        )

    monkeypatch.setattr(browser, "render", lambda page, png, width: Shot())
    assert cli._screenshot(tmp_path / "index.html", tmp_path / "s.png", 640) == 1
    assert "external request https://cdn/x.js" in capsys.readouterr().err
