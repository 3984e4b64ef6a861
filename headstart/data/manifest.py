"""Scan an image folder (`<root>/<class>/<file>`) into a manifest, and split it by content hash."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from headstart import HeadstartError
from headstart.data.inspection import FIELDS, InspectionCache, inspect_files

PATH_COLUMNS = ["path", "label", "sha256", "bytes"]
SPLITS = ("train", "val", "test")
# reasons that other modules recognise by their start
OUTSIDE = "resolves outside the data folder"
OTHER_EXTENSION = "extension "
NOT_IN_CLASS = "not in a class folder"
_KINDS = {
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


@dataclass(frozen=True)
class Entry:
    """One thing found under the data folder: a candidate image (reason None) or why it is not one."""

    rel: str  # posix path under the root, folders end in "/"; a non-UTF-8 name shown with \x escapes
    path: Path
    reason: str | None = None
    size: int = 0

    @property
    def label(self) -> str:
        return self.rel.split("/")[0] if "/" in self.rel else ""


def scan(root: str | Path, extensions: list[str], cache_dir: str | Path) -> pd.DataFrame:
    """One row per file under root: where it is, its hash, and what decoding it found (inspection.FIELDS).

    Entries that are not candidate images (see walk) are listed with the reason and never read; the
    rest are decoded once, in parallel, and remembered by content hash so a re-run only decodes new or
    changed files.
    """
    root = _existing_folder(root)
    entries = walk(root, extensions)
    if not entries:
        raise HeadstartError(f"data folder {root} is empty: put images in {root}/<class>/")
    inspected = iter(inspect_files([e.path for e in entries if e.reason is None], InspectionCache(cache_dir)))
    blank = {k: t() for k, t in FIELDS.items()}
    rows = []
    for e in entries:
        if e.reason is None:
            rows.append({"path": e.rel, "label": e.label, **next(inspected)})
        else:
            rows.append(
                {"path": e.rel, "label": e.label, "sha256": "", "bytes": e.size, **blank, "reason": e.reason}
            )
    return pd.DataFrame(rows, columns=PATH_COLUMNS + list(FIELDS))


def _existing_folder(root: str | Path) -> Path:
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise HeadstartError(
            f"data folder {root} is a file, not a folder: pass the folder that holds one folder per class"
        )
    if not root.is_dir():
        raise HeadstartError(
            f"data folder {root} does not exist: put images in {root}/<class>/ "
            f"or run `headstart data pull elpv --out {root}`"
        )
    return root


def walk(root: Path, extensions: list[str]) -> list[Entry]:
    """Every entry under root, sorted by path, without recursion (a folder 1,500 deep is just long).

    Hidden names (leading dot) are ignored, never listed. Links are followed when they resolve inside
    the root; only regular files in a class folder with one of the extensions are candidates. A folder
    that cannot be listed is an entry with its reason, so nothing is skipped without a word.
    """
    real_root, exts = os.path.realpath(root), {e.lower() for e in extensions}
    out: list[Entry] = []
    top = os.stat(root)
    # folder, its rel, and the (device, inode) chain of the folders above it, to stop link loops
    stack: list[tuple[str, str, tuple | None]] = [(str(root), "", ((top.st_dev, top.st_ino), None))]
    while stack:
        folder, prefix, above = stack.pop()
        try:
            with os.scandir(folder) as it:
                items = [i for i in it if not i.name.startswith(".")]
        except OSError as exc:
            if not prefix:
                raise HeadstartError(
                    f"data folder {root} cannot be read ({exc.strerror}): check its permissions"
                ) from None
            reason = (
                f"folder cannot be read ({exc.strerror}): give read access or move it out of the data folder"
            )
            out.append(Entry(prefix, Path(folder), reason))
            continue
        for item in items:
            entry, sub = _classify(item, prefix, real_root, exts, above)
            if sub is not None:
                stack.append(sub)
            else:
                out.append(entry)
    return sorted(out, key=lambda e: e.rel)


def _classify(item: os.DirEntry, prefix: str, real_root: str, exts: set[str], above: tuple | None):
    """(entry, None) for something listed, or (None, (folder, rel, above)) for a folder to walk."""
    rel, path, link = prefix + item.name, Path(item.path), item.is_symlink()
    size = _lsize(item)
    try:
        st = item.stat()  # follows a link: metadata only, nothing outside the root is read
    except OSError as exc:
        reason = "broken link" if exc.errno == errno.ENOENT else f"cannot be read ({exc.strerror})"
        # at the top level only folders count: a dead link there is a class folder that went missing
        folder = not prefix and path.suffix.lower() not in exts
        return Entry(_shown(rel) + "/" * folder, path, reason, size), None
    isdir = stat.S_ISDIR(st.st_mode)
    shown = _shown(rel) + ("/" if isdir else "")
    if shown.rstrip("/") != rel:
        return Entry(shown, path, "name is not valid UTF-8 (shown escaped): rename it", size), None
    if link:
        target = os.path.realpath(item.path)
        if os.path.commonpath([target, real_root]) != real_root:
            reason = f"{OUTSIDE} (to {_shown(target)}): never read; copy it into the data folder"
            return Entry(shown, path, reason, size), None
        if isdir and _loops((st.st_dev, st.st_ino), above):
            return Entry(shown, path, "link loop: it points to a folder above it", size), None
    if isdir:
        return None, (item.path, shown, ((st.st_dev, st.st_ino), above))
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "special file")
        return Entry(rel, path, f"not a regular file ({kind}): only regular files are read", size), None
    if not prefix:
        return Entry(rel, path, NOT_IN_CLASS, size), None
    if path.suffix.lower() not in exts:
        return Entry(
            rel, path, f"{OTHER_EXTENSION}{path.suffix or '(none)'} not in prepare.extensions", size
        ), None
    return Entry(rel, path, None, size), None


def _lsize(item: os.DirEntry) -> int:
    try:
        return item.stat(follow_symlinks=False).st_size
    except OSError:
        return 0


def _shown(rel: str) -> str:
    """The name as text: bytes that are not UTF-8 (kept by surrogateescape) become \\xNN escapes."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _loops(key: tuple[int, int], above: tuple | None) -> bool:
    while above is not None:
        if above[0] == key:
            return True
        above = above[1]
    return False


def class_labels(manifest: pd.DataFrame) -> list[str]:
    """The class folders that hold, or were meant to hold, images: every label with a candidate or a
    file or folder that could not be read, so a class whose images all went missing is still named."""
    pairs = zip(manifest["label"], manifest["reason"], strict=True)
    return sorted({label for label, reason in pairs if _holds_images(label, reason)})


def _holds_images(label: str, reason: str | None) -> bool:
    return bool(label) and not (reason or "").startswith(OTHER_EXTENSION)


def assign_splits(
    manifest: pd.DataFrame,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    kept: Mapping[str, str] | None = None,
) -> pd.Series:
    """train/val/test per image. An image in `kept` (the split ledger: sha256 -> split) keeps its
    split; a new image draws one from its content hash: u = sha256("seed:sha256") in [0, 1) is test
    below test_fraction, val below test_fraction + val_fraction, else train. Then every class is
    served (serve_classes): one training image, a test image from 2 images on, a val image from 3, so
    no class of a few images is refused for a split that drew none. Copies of one file share a split.
    """
    kept = kept or {}
    u = manifest["sha256"].map(lambda s: _unit(f"{seed}:{s}")).to_numpy(dtype=float)
    drawn = np.where(u < test_fraction, "test", np.where(u < test_fraction + val_fraction, "val", "train"))
    split = pd.Series(
        [kept.get(s, d) for s, d in zip(manifest["sha256"], drawn, strict=True)],
        index=manifest.index,
        dtype=object,
    )
    new = ~manifest["sha256"].isin(kept.keys()).to_numpy()
    return serve_classes(split, manifest["label"].to_numpy(), manifest["sha256"].to_numpy(), u, new)


# what a class of n images must hold: a training image, from 2 images a test image, from 3 a val image
SERVED = (("train", 1), ("test", 2), ("val", 3))


def serve_classes(split: pd.Series, labels, shas, u: np.ndarray, new: np.ndarray) -> pd.Series:
    """Give each class the splits SERVED asks for by a deterministic rule: the image taken is from
    the split with the most images of that class (never its last), a new image (not in the ledger)
    before a kept one, lowest hash first. Images only ever arrive by this rule, so a class that grows
    takes what it lacks from its new images and no kept image moves."""
    split = split.copy()
    order = np.lexsort((u, ~new))  # new first, then by hash: the same choice on every machine
    for label in sorted(set(labels)):
        mine = order[labels[order] == label]
        mine = mine[~pd.Series(shas[mine]).duplicated().to_numpy()]  # one vote per content
        for need, from_n in SERVED:
            have = split.iloc[mine].value_counts()
            if len(mine) < from_n or have.get(need, 0):
                continue
            donors = [s for s, k in have.items() if k > 1 and s != need]
            if not donors:
                continue
            donor = max(donors, key=lambda s: (have[s], s == "train"))
            take = next(i for i in mine if split.iloc[i] == donor)
            split[shas == shas[take]] = need  # every copy of it moves together
    return split


LEDGER = ".headstart-splits.csv"  # in the data folder: hidden, so never scanned as an image


def ledger_scheme(seed: int, val_fraction: float, test_fraction: float) -> str:
    """What the hash draws depend on: a ledger made under another scheme is started anew."""
    return f"seed={seed} val_fraction={val_fraction:g} test_fraction={test_fraction:g}"


def read_ledger(root: str | Path, scheme: str) -> tuple[dict[str, str], str]:
    """The split ledger in the data folder ({} when absent), and what became of it in words."""
    path = Path(root) / LEDGER
    if not path.is_file():
        return {}, f"no split ledger yet: {path} records the splits drawn now"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        header, rows = lines[0], [line.split(",") for line in lines[2:] if line]
        ledger = {sha: split for sha, split in rows}
        ok = header.startswith("# ") and all(s in SPLITS and len(h) == 64 for h, s in ledger.items())
    except (OSError, UnicodeDecodeError, IndexError, ValueError):
        ok, header = False, ""
    if not ok:
        return {}, f"split ledger {path} is damaged: the splits are drawn anew and it is rewritten"
    made = header.removeprefix("# headstart split ledger: ")
    if made != scheme:
        return {}, f"split ledger {path} was drawn with {made}, not {scheme}: the splits are drawn anew"
    return ledger, f"split ledger {path}: {len(ledger)} images keep their splits"


def ledger_text(ledger: Mapping[str, str], scheme: str) -> str:
    """The ledger as text: one `sha256,split` line per image ever split, sorted, so it diffs well."""
    rows = "".join(f"{sha},{ledger[sha]}\n" for sha in sorted(ledger))
    return f"# headstart split ledger: {scheme}\nsha256,split\n{rows}"


def _unit(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16) / 16**15


def data_hash(manifest: pd.DataFrame) -> str:
    """One hash of the data set: every (path, label, content) in a stable order."""
    lines = sorted(
        f"{p}\t{lab}\t{s}" for p, lab, s in manifest[["path", "label", "sha256"]].itertuples(index=False)
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def preflight(root: str | Path, extensions: list[str]) -> dict[str, int]:
    """The cheap checks (no decoding) that let `headstart run` fail in a second, not after startup. It
    walks the folder as the scan does, so both see the same classes, links and files."""
    root = _existing_folder(root)
    entries = walk(root, extensions)
    counts = {e.label: 0 for e in entries if _holds_images(e.label, e.reason)}
    for e in entries:
        if e.reason is None:
            counts[e.label] += 1
    if not any(counts.values()):
        raise HeadstartError(
            f"data folder {root} has no images in class folders "
            f"(<class>/<file> with extensions {', '.join(sorted(extensions))})"
        )
    if empty := [c for c, n in counts.items() if not n]:
        why = {e.label: f"{e.rel}: {e.reason}" for e in reversed(entries) if e.label in empty}
        raise HeadstartError(
            f"data folder {root}: class folder {', '.join(empty)} has no image that can be read "
            f"({'; '.join(why[c] for c in empty)}); fix it or move it out of the data folder"
        )
    if len(counts) < 2:
        raise HeadstartError(
            f"data folder {root} has one class ({next(iter(counts))}); "
            f"a classifier needs at least 2 class folders"
        )
    return counts
