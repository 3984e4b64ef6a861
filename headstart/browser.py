"""Pages as a person sees them: a local HTML file opened in headless Chromium, as on a closed network.

Debian's chromium (`apt-get install chromium`) driven by playwright, a dev dependency that never
downloads a browser of its own. Every request the page makes is recorded; one that would leave the
machine (any scheme but file:, data:, about:, blob:) is flagged and aborted, so the page renders as
it would offline whether or not this machine has internet.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from headstart import HeadstartError
from headstart.atomic import write_bytes

LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")
# No GPU, no sandbox (root in CI), and none of Chromium's own calls home
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

# Lazy images are made eager and every image is waited for (loaded or failed), so each is judged
_IMAGES = """async () => {
  const imgs = Array.from(document.images);
  for (const i of imgs) if (i.loading === "lazy") i.loading = "eager";
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(done => {
    i.addEventListener("load", done, {once: true});
    i.addEventListener("error", done, {once: true});
    setTimeout(done, 5000);
  })));
  return imgs.map(i => ({src: i.currentSrc || i.src, complete: i.complete, width: i.naturalWidth}));
}"""
_VISIBLE_TEXT = "els => els.filter(e => e.getClientRects().length > 0).map(e => e.innerText)"


@dataclass
class Rendered:
    url: str
    requests: list[str] = field(default_factory=list)  # every URL the page asked for, in order
    external: list[str] = field(default_factory=list)  # those that would leave the machine
    failed: list[str] = field(default_factory=list)  # "url: error" for local requests that failed
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)  # uncaught exceptions in the page's scripts
    text: str = ""  # the body's visible text
    images: list[dict] = field(default_factory=list)  # each <img>: src, complete, width (naturalWidth)
    matches: list[str] = field(default_factory=list)  # visible text of each element matching `query`
    screenshot: Path | None = None

    @property
    def broken_images(self) -> list[str]:
        return [i["src"] for i in self.images if not (i["complete"] and i["width"] > 0)]


def is_external(url: str) -> bool:
    return not url.startswith(LOCAL_SCHEMES)


def chromium() -> Path:
    """Debian's chromium, or the one named by HEADSTART_CHROMIUM."""
    path = Path(os.environ.get("HEADSTART_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium")
    if not path.is_file():
        raise HeadstartError(f"no Chromium at {path}: apt-get install chromium (or set HEADSTART_CHROMIUM)")
    return path


def render(
    html_path: Path,
    screenshot: Path | None = None,
    width: int = 1280,
    height: int = 800,
    query: str | None = None,
    wait_for: str | None = None,
    timeout_s: float = 30,
) -> Rendered:
    """Open a local page offline, wait for it to load (and for `wait_for`, a CSS selector, to show),
    and record its requests, errors, text, images and the visible elements matching `query`; a
    full-page PNG goes to `screenshot` when given."""
    sync_playwright, executable = _playwright(), chromium()
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise HeadstartError(f"no page to render at {html_path}")
    out = Rendered(html_path.as_uri())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(executable), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_s * 1000)
            _record(page, out)
            page.goto(out.url, wait_until="load")
            if wait_for:
                page.wait_for_selector(wait_for, state="visible")
            page.evaluate("document.fonts.ready.then(() => true)")
            out.images = page.evaluate(_IMAGES)
            out.text = page.inner_text("body")
            out.matches = page.eval_on_selector_all(query, _VISIBLE_TEXT) if query else []
            if screenshot is not None:
                out.screenshot = write_bytes(screenshot, page.screenshot(full_page=True))
        finally:
            browser.close()
    return out


def _record(page, out: Rendered) -> None:
    """Every request into `out`; an external one is flagged and aborted, as a closed network would."""

    def route(r):
        if is_external(r.request.url):
            r.abort("internetdisconnected")
        else:
            r.continue_()

    def on_request(request):
        out.requests.append(request.url)
        if is_external(request.url):
            out.external.append(request.url)

    def on_failed(request):
        if not is_external(request.url):
            out.failed.append(f"{request.url}: {request.failure}")

    page.route("**/*", route)
    page.on("request", on_request)
    page.on("requestfailed", on_failed)
    page.on("websocket", lambda ws: (out.requests.append(ws.url), out.external.append(ws.url)))
    page.on("console", lambda m: out.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: out.page_errors.append(str(e)))


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise HeadstartError(
            "rendering pages needs playwright, a dev dependency: pip install -e '.[dev]' "
            "(it drives Debian's chromium; no browser is downloaded)"
        ) from None
    return sync_playwright
