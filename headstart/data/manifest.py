"""Scan an image folder (`<root>/<class>/<file>`) into a manifest, and split it by content hash."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from headstart import HeadstartError
from headstart.data.inspection import FIELDS, InspectionCache, inspect_files

PATH_COLUMNS = ["path", "label", "sha256", "bytes"]


def scan(root: str | Path, extensions: list[str], cache_dir: str | Path) -> pd.DataFrame:
    """One row per file under root: where it is, its hash, and what decoding it found (inspection.FIELDS).

    Files that are not candidate images (outside a class folder, hidden, another extension, a link
    out of the root) are listed with the reason and never read; the rest are decoded once, in
    parallel, and remembered by content hash so a re-run only decodes new or changed files.
    """
    root = _existing_folder(root)
    real_root, exts = root.resolve(), {e.lower() for e in extensions}
    files = sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())
    if not files:
        raise HeadstartError(f"data folder {root} is empty: put images in {root}/<class>/")
    rels = [f.relative_to(root).as_posix() for f in files]
    reasons = [_skip_reason(f, rel, real_root, exts) for f, rel in zip(files, rels, strict=True)]
    candidates = [f for f, r in zip(files, reasons, strict=True) if r is None]
    inspected = iter(inspect_files(candidates, InspectionCache(cache_dir)))
    blank = {k: t() for k, t in FIELDS.items()}
    rows = []
    for f, rel, reason in zip(files, rels, reasons, strict=True):
        label = rel.split("/")[0] if "/" in rel else ""
        if reason is None:
            rows.append({"path": rel, "label": label, **next(inspected)})
        else:
            size = f.lstat().st_size
            rows.append({"path": rel, "label": label, "sha256": "", "bytes": size, **blank, "reason": reason})
    return pd.DataFrame(rows, columns=PATH_COLUMNS + list(FIELDS))


def _existing_folder(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise HeadstartError(
            f"data folder {root} does not exist: put images in {root}/<class>/ "
            f"or run `headstart data pull elpv --out {root}`"
        )
    return root


def _skip_reason(path: Path, rel: str, real_root: Path, exts: set[str]) -> str | None:
    if "/" not in rel:
        return "not in a class folder"
    if not path.exists():
        return "broken link"
    if not path.resolve().is_relative_to(real_root):
        return "resolves outside the data folder"
    if any(part.startswith(".") for part in rel.split("/")):
        return "hidden file"
    if path.suffix.lower() not in exts:
        return f"extension {path.suffix or '(none)'} not in prepare.extensions"
    return None


def assign_splits(manifest: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    """train/val/test from each image's content hash alone: u = sha256("seed:sha256") as a number in
    [0, 1); test when u < test_fraction, val when u < test_fraction + val_fraction, else train.

    An image's split depends on nothing else, so it never changes as images are added or removed
    (same seed and fractions), and copies of one file always share a split. Classes are split in
    expectation only: a small class may draw no val or test image, which validation reports
    (validate.min_per_class) rather than moving images here, as that would move them again later.
    """
    u = manifest["sha256"].map(lambda s: _unit(f"{seed}:{s}")).to_numpy(dtype=float)
    split = np.where(u < test_fraction, "test", np.where(u < test_fraction + val_fraction, "val", "train"))
    return pd.Series(split, index=manifest.index, dtype=object)


def _unit(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16) / 16**15


def data_hash(manifest: pd.DataFrame) -> str:
    """One hash of the data set: every (path, label, content) in a stable order."""
    lines = sorted(
        f"{p}\t{lab}\t{s}" for p, lab, s in manifest[["path", "label", "sha256"]].itertuples(index=False)
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def preflight(root: str | Path, extensions: list[str]) -> dict[str, int]:
    """The cheap checks (no decoding) that let `headstart run` fail in a second, not after startup."""
    root = _existing_folder(root)
    exts = {e.lower() for e in extensions}
    counts = {
        d.name: sum(
            1 for f in d.rglob("*") if f.is_file() and f.suffix.lower() in exts and not f.name.startswith(".")
        )
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".")
    }
    counts = {c: n for c, n in counts.items() if n}
    if not counts:
        raise HeadstartError(
            f"data folder {root} has no images in class folders "
            f"(<class>/<file> with extensions {', '.join(sorted(exts))})"
        )
    if len(counts) < 2:
        raise HeadstartError(
            f"data folder {root} has one class ({next(iter(counts))}); "
            f"a classifier needs at least 2 class folders"
        )
    return counts
