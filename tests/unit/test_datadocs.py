"""Data Docs offline: every page loads only the site's own files, and the index draws its table in
Chromium with the network closed."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import headstart.datadocs as datadocs
from headstart.config import PrepareParams, ValidateParams
from headstart.data.manifest import assign_splits, scan
from headstart.validation import validate_manifest
from tests.conftest import make_folder

RELAXED = {"train": 1, "val": 0, "test": 0}


def _site(tmp: Path) -> Path:
    """Data Docs of a tiny run with one warning (an unreadable file), so a failed row is drawn too."""
    root = make_folder(tmp / "data", per_class=6)
    (root / "cat" / "broken.png").write_text("not an image")
    m = scan(root, PrepareParams().extensions, tmp / "cache")
    m["split"] = ""
    m.loc[m["readable"], "split"] = assign_splits(m[m["readable"]], 0.15, 0.2, 0)
    v = validate_manifest(m, ValidateParams(min_per_class=1, min_per_split=RELAXED), docs_dir=tmp / "docs")
    assert v.report["success"] and "every_file_is_a_readable_image" in v.report["warnings"]
    return tmp / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return _site(tmp_path_factory.mktemp("datadocs"))


class _Loads(HTMLParser):
    """What a page loads by itself: scripts, stylesheets, icons, images, frames (not the links a
    person may click), and url(...) in inline styles."""

    ATTRS = {"script": "src", "link": "href", "img": "src", "iframe": "src", "source": "src", "embed": "src"}

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get(self.ATTRS.get(tag, "")):
            self.urls.append(attrs[self.ATTRS[tag]])
        self.urls += _css_urls(attrs.get("style") or "")

    def handle_data(self, data):
        self.urls += _css_urls(data)  # <style> blocks (and harmless in scripts: a url( there is no load)


def _css_urls(text: str) -> list[str]:
    return [u.strip("'\"") for u in re.findall(r"url\(\s*([^)]+?)\s*\)", text)]


def _loads(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".css":
        return _css_urls(text)
    parser = _Loads()
    parser.feed(text)
    return parser.urls


def _pages(site: Path) -> list[Path]:
    return [*site.rglob("*.html"), *site.rglob("*.css")]


def test_every_page_loads_only_the_site_s_own_files(site):
    pages = _pages(site)
    assert len(list(site.rglob("*.html"))) >= 5  # the index, 4 suites' validations and expectations
    for page in pages:
        for url in _loads(page):
            if url.startswith("data:"):
                continue
            assert "://" not in url and not url.startswith("//"), f"{page.relative_to(site)} loads {url}"
            target = (page.parent / url.split("?")[0].split("#")[0]).resolve()
            if page.suffix == ".css" and target.suffix in (".ttf", ".eot", ".svg", ".woff"):
                continue  # a font's fallback formats: Chromium takes the woff2 that is shipped
            assert target.is_file(), f"{page.relative_to(site)} loads {url}, which is missing"


def test_no_page_draws_a_chart(site):
    """vega is not shipped (datadocs.ASSETS): a page that drew a chart would need it."""
    assert not [p for p in site.rglob("*.html") if "vegaEmbed(" in p.read_text(encoding="utf-8")]


def test_vendored_files_are_exactly_the_ones_used_and_carry_licences():
    shipped = {
        p.relative_to(datadocs.VENDORED).as_posix()
        for p in datadocs.VENDORED.rglob("*")
        if p.is_file() and p.parent.name != "licenses"
    }
    used = {f for files in datadocs.ASSETS.values() for f in files} | {
        "fontawesome/webfonts/fa-solid-900.woff2"
    }
    assert shipped == used
    licences = {p.stem for p in (datadocs.VENDORED / "licenses").glob("*.txt")}
    assert licences == {
        "jquery", "popper.js", "bootstrap", "bootstrap-table", "bootstrap-datepicker", "bootstrap-dark",
        "fontawesome-free",
    }  # fmt: skip


def test_localise_rewrites_tags_and_drops_integrity():
    page = (
        '<script src="https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js" '
        'integrity="sha384-x" crossorigin="anonymous"></script>'
        '<link rel="stylesheet" href="https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css">'
        '<script src="https://cdn.jsdelivr.net/npm/vega@5"></script>'
        '<img src="https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png?d=1">'
        '<a href="https://greatexpectations.io">GX</a>'
    )
    assert datadocs.localise(page, "../") == (
        '<script src="../static/vendor/bootstrap.min.js"></script>'
        '<link rel="stylesheet" href="../static/vendor/fontawesome/css/fontawesome.min.css">'
        '<link rel="stylesheet" href="../static/vendor/fontawesome/css/solid.min.css">'
        '<img src="../static/images/logo-long.png">'
        '<a href="https://greatexpectations.io">GX</a>'  # a link a person may follow stays
    )


def _screenshot_is_a_page(path: Path, width: int) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width == width and im.height >= 600
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 10  # not a blank page
    assert (pixels < 128).mean() > 0.01  # some dark ink: text, icons


@pytest.mark.browser
@pytest.mark.slow
def test_index_shows_its_table_offline(site, tmp_path):
    from headstart.browser import render

    rows = "table tbody tr"
    shot = tmp_path / "index.png"
    r = render(site / "index.html", shot, query=rows, wait_for=rows)
    assert r.external == [] and r.failed == [] and r.page_errors == []
    assert len(r.matches) == 4  # one validation result per table: files, images, counts, balance
    assert any("headstart_files" in row for row in r.matches)
    assert "Showing 1 to 4 of 4 rows" in r.text  # bootstrap-table drew it
    assert r.images and not r.broken_images  # the logo
    assert any(u.endswith("/fa-solid-900.woff2") for u in r.requests)  # the status icons' font
    _screenshot_is_a_page(shot, 1280)


@pytest.mark.browser
@pytest.mark.slow
def test_a_validation_page_is_styled_offline(site):
    from headstart.browser import render

    (page,) = site.glob("validations/headstart_files/*/*/*.html")
    r = render(page, query="table tbody tr")
    assert r.external == [] and r.failed == [] and r.page_errors == []
    assert any("every" in t or "values must" in t for t in r.matches)
    assert any(u.endswith("/bootstrap.min.css") for u in r.requests)


@pytest.mark.browser
@pytest.mark.slow
def test_gx_s_own_pages_are_empty_offline(tmp_path, monkeypatch):
    """What make_offline fixes: GX's pages as built ask the internet, and offline draw no rows."""
    from headstart.browser import render

    monkeypatch.setattr("headstart.validation.make_offline", lambda site: None)
    site = _site(tmp_path)
    r = render(site / "index.html", query="table tbody tr")
    assert any("jquery" in u for u in r.external) and r.matches == []
