"""Scan an image folder (`<root>/<class>/<file>`) into a manifest, and split it by content hash."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from headstart import HeadstartError
from headstart.preprocess import MAX_PIXELS, decode

COLUMNS = ["path", "label", "sha256", "width", "height", "mode", "bytes"]


@dataclass
class Scan:
    manifest: pd.DataFrame  # one row per readable image, COLUMNS
    skipped: pd.DataFrame  # path, reason: every file that is not in the manifest, and why


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def probe(path: Path) -> dict:
    """Read one file fully (a truncated image fails here, not in training); raise ValueError if bad."""
    data = path.read_bytes()
    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(path) as img:
            width, height, mode = img.width, img.height, img.mode
        if width * height > MAX_PIXELS:
            raise ValueError(f"{width}x{height} exceeds the {MAX_PIXELS} pixel limit")
        decode(path)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    return {"sha256": sha256_bytes(data), "width": width, "height": height, "mode": mode, "bytes": len(data)}


def scan(root: str | Path, extensions: list[str]) -> Scan:
    """List every file under root; readable images in class folders go to the manifest."""
    root = Path(root)
    if not root.is_dir():
        raise HeadstartError(
            f"data folder {root} does not exist: put images in {root}/<class>/ "
            f"or run `headstart data pull elpv --out {root}`"
        )
    real_root = root.resolve()
    rows, skipped = [], []
    exts = {e.lower() for e in extensions}
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        reason = _skip_reason(path, rel, real_root, exts)
        if reason is None:
            try:
                rows.append({"path": rel, "label": rel.split("/")[0], **probe(path)})
                continue
            except (ValueError, OSError) as exc:
                reason = str(exc)
        skipped.append({"path": rel, "reason": reason})
    manifest = pd.DataFrame(rows, columns=COLUMNS)
    _check_usable(root, manifest, skipped)
    return Scan(manifest, pd.DataFrame(skipped, columns=["path", "reason"]))


def _skip_reason(path: Path, rel: str, real_root: Path, exts: set[str]) -> str | None:
    if "/" not in rel:
        return "not in a class folder"
    if not path.resolve().is_relative_to(real_root):
        return "resolves outside the data folder"
    if any(part.startswith(".") for part in rel.split("/")):
        return "hidden file"
    if path.suffix.lower() not in exts:
        return f"extension {path.suffix or '(none)'} not in prepare.extensions"
    return None


def _check_usable(root: Path, manifest: pd.DataFrame, skipped: list[dict]) -> None:
    if manifest.empty:
        hint = (
            f" ({len(skipped)} files skipped, first: {skipped[0]['path']}: {skipped[0]['reason']})"
            if skipped
            else ""
        )
        raise HeadstartError(f"data folder {root} has no readable images in class folders{hint}")
    classes = sorted(manifest["label"].unique())
    if len(classes) < 2:
        raise HeadstartError(
            f"data folder {root} has one class ({classes[0]}); a classifier needs at least 2 class folders"
        )


def assign_splits(manifest: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    """train/val/test from each image's content hash: adding images never moves existing ones.

    Stratified in expectation (each class is split by the same hash thresholds). A class with at least
    3 images that drew no val or test image lends its lowest-hash training image, so small classes are
    still measured; once a class is large enough this never triggers and the split is purely by hash.
    """
    u = manifest["sha256"].map(lambda s: _unit(f"{seed}:{s}"))
    split = pd.Series(
        np.where(u < test_fraction, "test", np.where(u < test_fraction + val_fraction, "val", "train")),
        index=manifest.index,
        dtype=object,
    )
    for _, idx in manifest.groupby("label").groups.items():
        if len(idx) < 3:
            continue
        for name, fraction in (("test", test_fraction), ("val", val_fraction)):
            if fraction > 0 and not (split[idx] == name).any():
                train = {manifest.at[i, "sha256"]: u[i] for i in idx if split[i] == "train"}
                if len(train) > 1:  # lend by content, so every copy of a file moves together
                    split[manifest["sha256"] == min(train, key=train.get)] = name
    return split


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
    root = Path(root)
    if not root.is_dir():
        raise HeadstartError(
            f"data folder {root} does not exist: put images in {root}/<class>/ "
            f"or run `headstart data pull elpv --out {root}`"
        )
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
