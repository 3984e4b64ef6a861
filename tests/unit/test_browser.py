"""The headless-Chromium harness on a hand-written page: requests leaving the machine are flagged,
broken images, script errors and visible text are reported, the screenshot is the page."""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from headstart import HeadstartError
from headstart.browser import is_external, render

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>t</title></head>
<body style="background:#fff"><h1>Héllo &lt;b&gt;</h1>
<p class="row">shown</p><p class="row" style="display:none">hidden</p>
<img src="ok.png"><img src="https://example.com/x.png"><img src="missing.png" loading="lazy">
<script>console.error("boom"); notDefined();</script></body></html>"""


@pytest.fixture
def page(tmp_path):
    Image.new("RGB", (20, 10), (200, 0, 0)).save(tmp_path / "ok.png")
    path = tmp_path / "page.html"
    path.write_text(PAGE, encoding="utf-8")
    return path


@pytest.mark.browser
def test_render_flags_what_leaves_the_machine(page, tmp_path):
    shot = tmp_path / "shots" / "page.png"
    r = render(page, shot, width=640, query="p.row")
    assert r.external == ["https://example.com/x.png"]  # attempted, recorded, aborted
    assert r.requests[0] == page.as_uri() and page.with_name("ok.png").as_uri() in r.requests
    assert sorted(r.broken_images) == sorted(
        ["https://example.com/x.png", page.with_name("missing.png").as_uri()]
    )
    assert r.failed == [f"{page.with_name('missing.png').as_uri()}: net::ERR_FILE_NOT_FOUND"]
    assert "boom" in r.console_errors and any("notDefined" in e for e in r.page_errors)
    assert r.matches == ["shown"] and "Héllo <b>" in r.text and "hidden" not in r.text
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width == 640
        assert im.convert("RGB").getpixel((10, 5)) == (255, 255, 255)


def test_schemes_that_stay_on_the_machine():
    assert not any(
        map(is_external, ["file:///a", "data:image/png;base64,x", "about:blank", "blob:file:///x"])
    )
    assert all(map(is_external, ["https://a.b/c", "http://127.0.0.1/", "ws://x", "//cdn.x/y"]))


def test_missing_page_is_one_line(tmp_path):
    with pytest.raises(HeadstartError, match="no page to render"):
        render(tmp_path / "nope.html")


def test_missing_chromium_names_the_package(page, monkeypatch):
    monkeypatch.setenv("HEADSTART_CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(HeadstartError, match="apt-get install chromium"):
        render(page)


def test_missing_playwright_names_the_extra(page, monkeypatch):
    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)  # import fails as if not installed
    with pytest.raises(HeadstartError, match=r"playwright, a dev dependency: pip install -e '\.\[dev\]'"):
        render(page)
