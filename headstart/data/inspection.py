"""Decode each image once and record what validation needs; cached by content hash across runs."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageStat

from headstart import provenance
from headstart.preprocess import MAX_PIXELS, decode

log = logging.getLogger(__name__)
FIELDS = {
    "readable": bool,
    "reason": str,
    "format": str,
    "mode": str,
    "width": int,
    "height": int,
    "channels": int,
    "bit_depth": int,
    "frames": int,
    "exif_rotated": bool,
    "mean_r": float,
    "mean_g": float,
    "mean_b": float,
    "std_r": float,
    "std_g": float,
    "std_b": float,
    "phash": str,
}
_BIT_DEPTH = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}


def inspect_bytes(data: bytes) -> dict:
    """Everything validation needs from one file's content; never raises (reason says what failed)."""
    import io

    out = {k: t() for k, t in FIELDS.items()}
    if not data:
        return {**out, "reason": "empty file"}
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                return {**out, "reason": f"oversized: {w}x{h} exceeds {MAX_PIXELS} pixels"}
            info = {
                "format": img.format or "",
                "mode": img.mode,
                "channels": len(img.getbands()),
                "bit_depth": _BIT_DEPTH.get(img.mode, 8),
                "frames": getattr(img, "n_frames", 1),
                # 2..8 turn or mirror; any other value is invalid and, as in decode, ignored
                "exif_rotated": img.getexif().get(0x0112, 1) in range(2, 9),
            }
            if img.mode == "F" and not np.isfinite(np.asarray(img)).all():
                return {**out, "reason": "non-finite pixel values (NaN or inf) in a float image"}
            rgb = decode(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        return {**out, "reason": f"oversized: {exc}"}
    except Image.UnidentifiedImageError:  # its message holds a BytesIO address: not reproducible
        return {**out, "reason": "not a readable image (format not recognised)"}
    except Exception as exc:
        return {**out, "reason": f"not a readable image ({type(exc).__name__}: {exc})"[:300]}
    stat = ImageStat.Stat(rgb)
    mean, std = [m / 255 for m in stat.mean], [s / 255 for s in stat.stddev]
    return {
        **out,
        **info,
        "readable": True,
        "width": rgb.width,
        "height": rgb.height,
        "mean_r": mean[0],
        "mean_g": mean[1],
        "mean_b": mean[2],
        "std_r": std[0],
        "std_g": std[1],
        "std_b": std[2],
        "phash": phash(rgb),
    }


def phash(img: Image.Image) -> str:
    """64-bit perceptual hash (DCT of a 32x32 grey thumbnail, low 8x8 vs their median), as hex."""
    from scipy.fft import dctn

    grey = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), np.float32)
    low = dctn(grey, norm="ortho")[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise bit distances between two arrays of uint64 hashes: shape (len(a), len(b))."""
    return np.bitwise_count(a[:, None] ^ b[None, :]).astype(np.int16)


def _inspect_file(path: str) -> tuple[str, int, dict | None]:
    data = _read(Path(path))  # None: vanished since it was hashed; its row says so below
    if data is None:
        return "", -1, None
    return hashlib.sha256(data).hexdigest(), len(data), inspect_bytes(data) if data else None


def inspection_key() -> str:
    """What the cached results depend on: this module's and the decoder's code, their libraries."""
    code = provenance.code_hash("headstart.data.inspection", "headstart.preprocess")
    return provenance.derive_key("inspection", code, provenance.library_versions("pillow", "numpy", "scipy"))


class InspectionCache:
    """sha256 -> inspection results, one parquet file per inspection_key, rewritten atomically after
    each scan; a file that does not read back as those fields is discarded with a warning and rebuilt."""

    def __init__(self, root: str | Path):
        self.path = Path(root) / "inspection" / f"{inspection_key()}.parquet"
        self.entries: dict[str, dict] = self._read() if self.path.exists() else {}

    def _read(self) -> dict[str, dict]:
        try:
            rows = pd.read_parquet(self.path).to_dict("records")
            return {row.pop("sha256"): {k: FIELDS[k](row[k]) for k in FIELDS} for row in rows}
        except Exception as exc:  # truncated, overwritten, other columns: rebuilt, never trusted
            log.warning(
                "inspection cache %s is damaged (%s: %s); inspecting again",
                self.path,
                type(exc).__name__,
                exc,
            )
            self.path.unlink(missing_ok=True)
            return {}

    def get(self, sha: str) -> dict | None:
        return self.entries.get(sha)

    def save(self, new: dict[str, dict]) -> None:
        from headstart.atomic import write_bytes

        if not new:
            return
        self.entries.update(new)
        frame = pd.DataFrame.from_dict(self.entries, orient="index").rename_axis("sha256").reset_index()
        write_bytes(self.path, frame.to_parquet(index=False))


def inspect_files(paths: list[Path], cache: InspectionCache, workers: int | None = None) -> list[dict]:
    """sha256, bytes and inspection results for each file: hashing is cheap, decoding only on a cache miss."""
    hashed = [_hash(p) for p in paths]
    misses = {
        sha: str(p) for p, (sha, n) in zip(paths, hashed, strict=True) if n > 0 and cache.get(sha) is None
    }
    todo = sorted(misses.values())  # once per content, not once per copy
    workers = workers or min(len(todo) // 64 + 1, os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            fresh = list(pool.map(_inspect_file, todo, chunksize=64))
    else:
        fresh = [_inspect_file(p) for p in todo]
    new = {sha: info for sha, _, info in fresh if info is not None}
    cache.save(new)
    out = []
    for sha, n in hashed:
        if n <= 0:
            info = inspect_bytes(b"") if n == 0 else {**inspect_bytes(b""), "reason": "cannot be read"}
        else:
            info = cache.get(sha) or {**inspect_bytes(b""), "reason": "changed while read"}
        out.append({"sha256": sha, "bytes": max(n, 0), **info})
    return out


def _hash(path: Path) -> tuple[str, int]:
    """Content hash and size; ("", -1) when the file cannot be read at all."""
    data = _read(path)
    return ("", -1) if data is None else (hashlib.sha256(data).hexdigest(), len(data))


def _read(path: Path) -> bytes | None:
    """A regular file's bytes; None otherwise. Opened without blocking and checked after opening, so
    a FIFO put in a file's place since the scan cannot hang the read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError:
        return None
    finally:
        os.close(fd)
