"""Image decoding and the backbone's eval preprocessing, in numpy and Pillow only.

Training, evaluation, export parity and the torch-free runtime all call these functions, so the
pixels a deployed model sees are computed by the same code that trained it.
"""

from __future__ import annotations

import json
import math
import os
import stat
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# A decompression-bomb guard, checked on the header before any pixel is decoded (check_size). Pillow's
# own check, set to the same number, raises above twice it; its warning below that is silenced, since
# check_size refuses those images with a reason anyway.
MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageRefused(ValueError):
    """A file headstart will not decode, with the reason: not a regular file, or too many pixels."""


def check_size(width: int, height: int) -> None:
    """The per-image bound on decoding. No aspect-ratio bound is needed: resize_crop resamples only
    the crop, so the work after decoding is bounded by the output size whatever the shape."""
    if width * height > MAX_PIXELS:
        raise ImageRefused(f"oversized: {width}x{height} exceeds {MAX_PIXELS} pixels")


def open_regular(path: str | Path) -> BinaryIO:
    """A regular file opened for reading; anything else (FIFO, device, socket, folder) is refused.
    Opening a FIFO blocks until a writer comes: O_NONBLOCK makes the open return at once, and fstat
    judges what was opened, so a file swapped after a check cannot slip through."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageRefused(f"not a regular file ({_file_kind(mode)}); only regular files are read")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    kinds |= {stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a folder"}
    return next((name for test, name in kinds.items() if test(mode)), "not a file")


_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class InputSpec:
    """What a backbone expects: the pretrained config, not params.yaml, decides it (as timm does)."""

    size: int
    mean: tuple[float, ...]  # one value per channel
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    channels: int = 3  # 1: the model takes grey images (a from-scratch model on grey data)

    @property
    def resize_to(self) -> int:
        return math.floor(self.size / self.crop_pct)  # timm's eval transform

    def to_json(self) -> str:
        d = asdict(self)
        if d["channels"] == 3:  # the JSON of every 3-channel spec stays what it was (cache keys)
            del d["channels"]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> InputSpec:
        d = json.loads(text)
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


def decode(path: str | Path | BinaryIO, keep_grey: bool = False) -> Image.Image:
    """Open an image with its EXIF orientation applied, as RGB (or L, for a grey image when
    keep_grey: resizing one channel is a third of the work and gives the same pixels); raises on
    anything unreadable, ImageRefused (before decoding) on what open_regular and check_size refuse."""
    with open_regular(path) if isinstance(path, str | Path) else nullcontext(path) as f:
        return _decode(f, keep_grey)


def _decode(f: BinaryIO, keep_grey: bool) -> Image.Image:
    try:
        img = Image.open(f)
    except Image.DecompressionBombError as exc:  # over twice MAX_PIXELS: Pillow refuses in open
        raise ImageRefused(f"oversized: {exc}") from None
    with img:
        check_size(*img.size)
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grey: rescale, not clip
            arr = np.asarray(img, dtype=np.float32)
            arr = arr - arr.min()
            img = Image.fromarray((arr * (255.0 / max(float(arr.max()), 1e-12))).astype(np.uint8))
        if keep_grey and img.mode == "L":
            img.load()
            return img
        return img.convert("RGB")


def resize_crop(img: Image.Image, spec: InputSpec) -> Image.Image:
    """Resize the shorter side to spec.resize_to, centre-crop spec.size: the geometric half.
    Only the crop's source region is resampled (Pillow's `box`): the same filter taps as resizing
    it all and cropping (equal up to rounding), without the whole resized image, which for a
    1x40000 strip would be 256x10,240,000 pixels."""
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if spec.channels == 1 and img.mode != "L":
        img = img.convert("L")
    w, h = img.size
    scale = spec.resize_to / min(w, h)
    new_w, new_h = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
    left, top = (new_w - spec.size) // 2, (new_h - spec.size) // 2
    sx, sy = w / new_w, h / new_h  # resized -> source coordinates
    box = (left * sx, top * sy, (left + spec.size) * sx, (top + spec.size) * sy)
    return img.resize((spec.size, spec.size), _INTERPOLATION[spec.interpolation], box=box)


def to_uint8(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """What a model exported with export.input=uint8 takes: resized, cropped, uint8 HWC with
    spec.channels channels (a grey image repeated for an RGB model; resize_crop makes a colour image
    grey for a grey model, as training does)."""
    arr = np.asarray(resize_crop(img, spec), dtype=np.uint8)
    return np.repeat(arr[:, :, None], spec.channels, axis=2) if arr.ndim == 2 else arr


def preprocess(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """Resize the shorter side, centre-crop, scale to [0,1], normalise: float32 CHW, spec.channels deep."""
    return normalise(np.asarray(resize_crop(img, spec)), spec)


def normalise(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resized, cropped pixels (HW grey or HWC RGB, 0-255) -> (x/255 - mean)/std as float32 CHW,
    spec.channels deep."""
    arr = pixels.astype(np.float32)
    chw = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # a grey image feeds all 3
    std = np.asarray(spec.std, np.float32)[:, None, None]
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    out = np.empty((spec.channels, spec.size, spec.size), np.float32)
    np.multiply(chw, np.float32(1 / 255) / std, out=out)  # (x/255 - mean)/std, in two passes
    out -= mean / std
    return out


def load_image(path: str | Path, spec: InputSpec) -> np.ndarray:
    """One image file as the model's input: float32 CHW."""
    return preprocess(decode(path, keep_grey=True), spec)


def augment(img: Image.Image, seed: int) -> Image.Image:
    """One training view, fully determined by `seed`: a random resized crop (60-100% of the area,
    aspect 3/4-4/3), a horizontal flip half the time, brightness and contrast within 20%."""
    from PIL import ImageEnhance

    rng = np.random.default_rng(seed)
    w, h = img.size
    area = w * h * rng.uniform(0.6, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = min(w, max(1, round(math.sqrt(area * ratio)))), min(h, max(1, round(math.sqrt(area / ratio))))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))


def load_view(path: str | Path, spec: InputSpec, seed: int) -> np.ndarray:
    """An augmented training view of an image file (see `augment`) as the model's input."""
    return preprocess(augment(decode(path, keep_grey=True), seed), spec)


def load_batch(paths: list[str | Path], spec: InputSpec) -> np.ndarray:
    """Decode and preprocess a list of images into one NCHW float32 array."""
    return np.stack([load_image(p, spec) for p in paths])
