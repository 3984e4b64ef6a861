"""Great Expectations Data Docs that render with no network: local copies of their CDN assets.

GX 1.24's page templates load jQuery, Bootstrap, bootstrap-table, Font Awesome and more from CDNs
(render/view/templates/page.j2, index_page.j2, js_script_imports.j2) and take no local alternative (a
custom views directory is searched after GX's own templates, so it cannot replace them). Offline, the
index's table, drawn by bootstrap-table, is empty and every page is unstyled. After build_data_docs,
`make_offline` copies the vendored minified files (headstart/static/datadocs, licences beside them) into
the site and points every page at them. The files are the npm packages' own dist files, byte for byte
(Bootstrap's and Popper's match the SRI hashes GX pins).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from headstart.atomic import write_text

VENDORED = Path(__file__).parent / "static" / "datadocs"
VENDOR = "static/vendor"  # inside the site, so the folder stays whole when copied or logged to MLflow

# Each CDN URL in GX's templates -> the vendored files that replace it (npm package@version in comments).
# vega, vega-lite and vega-embed draw charts (graph.j2) that none of headstart's expectations renders
# (tests/unit/test_datadocs.py holds every page to that): their tags are dropped, nothing shipped.
_FILTER, _FILTER_DIR = "https://unpkg.com/bootstrap-table@", "/dist/extensions/filter-control"
ASSETS: dict[str, tuple[str, ...]] = {
    "https://code.jquery.com/jquery-3.7.1.min.js": ("jquery.min.js",),  # jquery@3.7.1
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": ("popper.min.js",),
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": ("bootstrap.min.css",),
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": ("bootstrap.min.js",),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": ("bootstrap-table.min.css",),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": ("bootstrap-table.min.js",),
    # GX's pages load the filter-control CSS of 1.19.0 (plain or minified); 1.19.1's serves for both
    f"{_FILTER}1.19.0{_FILTER_DIR}/bootstrap-table-filter-control.css": (
        "bootstrap-table-filter-control.min.css",
    ),
    f"{_FILTER}1.19.0{_FILTER_DIR}/bootstrap-table-filter-control.min.css": (
        "bootstrap-table-filter-control.min.css",
    ),
    f"{_FILTER}1.19.1{_FILTER_DIR}/bootstrap-table-filter-control.min.js": (
        "bootstrap-table-filter-control.min.js",
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css": (
        "bootstrap-datepicker.min.css",
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js": (
        "bootstrap-datepicker.min.js",
    ),
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css": (
        "bootstrap-prefers-dark.min.css",  # @forevolve/bootstrap-dark@1.1.0, its minified build
    ),
    # @fortawesome/fontawesome-free@6.6.0: GX uses only solid icons (fas fa-check-circle, fa-times, ...),
    # so the core and solid styles with their one woff2 font stand in for all.min.css and its 7 fonts
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": (
        "fontawesome/css/fontawesome.min.css",
        "fontawesome/css/solid.min.css",
    ),
    "https://cdn.jsdelivr.net/npm/vega@5": (),
    "https://cdn.jsdelivr.net/npm/vega-lite@5": (),
    "https://cdn.jsdelivr.net/npm/vega-embed@6": (),
}
_TAG = re.compile(r'<(?:script|link)\b[^>]*?\b(?:src|href)="(https?://[^"]+)"[^>]*>(?:\s*</script>)?')
# GX's logo comes from its web-assets bucket; the site already holds logo-long.png in static/images
_LOGO = re.compile(
    r"https://great-expectations-web-assets\.s3\.us-east-2\.amazonaws\.com/([\w.-]+?\.png)[^\"')]*"
)
_LOGOS = {"full_logo_dark.png": "logo-long.png"}  # the dark-mode logo, which GX does not ship
# GX's favicon.j2 counts one folder too few above a validation page (its run time is a 4th level)
_FAVICON = re.compile(r'href="(?:\.\./|\./)*static/images/favicon\.ico"')


def make_offline(site: Path) -> None:
    """Copy the vendored assets into the built site and point its pages and styles at them."""
    site = Path(site)
    shutil.copytree(VENDORED, site / VENDOR, dirs_exist_ok=True)
    for page in [*site.rglob("*.html"), *(site / "static" / "styles").glob("*.css")]:
        text = page.read_text(encoding="utf-8")
        local = localise(text, Path(os.path.relpath(site, page.parent)).as_posix() + "/")
        if local != text:
            write_text(page, local)


def localise(text: str, root: str) -> str:
    """The page's CDN tags and logo URLs rewritten to the site's own copies; `root` leads to the site."""
    text = _TAG.sub(lambda m: _tags(m, root), text)
    text = _FAVICON.sub(f'href="{root}static/images/favicon.ico"', text)
    return _LOGO.sub(lambda m: f"{root}static/images/{_LOGOS.get(m[1], m[1])}", text)


def _tags(m: re.Match, root: str) -> str:
    files = ASSETS.get(m[1])
    if files is None:  # unknown: left as is, and the offline test names it
        return m[0]
    return "".join(
        f'<script src="{root}{VENDOR}/{f}"></script>'
        if f.endswith(".js")
        else f'<link rel="stylesheet" href="{root}{VENDOR}/{f}">'
        for f in files
    )
