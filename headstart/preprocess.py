"""Image decoding and the backbone's eval preprocessing, in numpy and Pillow only.

Training, evaluation, export parity and the torch-free runtime all call these functions, so the
pixels a deployed model sees are computed by the same code that trained it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# A decompression-bomb guard: Pillow warns at ~89 Mpx and raises at twice that; we refuse earlier.
MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

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
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    @property
    def resize_to(self) -> int:
        return math.floor(self.size / self.crop_pct)  # timm's eval transform

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> InputSpec:
        d = json.loads(text)
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


def decode(path: str | Path, keep_grey: bool = False) -> Image.Image:
    """Open an image with its EXIF orientation applied, as RGB (or L, for a grey image when
    keep_grey: resizing one channel is a third of the work and gives the same pixels); raises on
    anything unreadable."""
    with Image.open(path) as img:
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
    """Resize the shorter side to spec.resize_to, centre-crop spec.size: the geometric half."""
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    w, h = img.size
    scale = spec.resize_to / min(w, h)
    new_w, new_h = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
    left, top = (new_w - spec.size) // 2, (new_h - spec.size) // 2
    return img.resize((new_w, new_h), _INTERPOLATION[spec.interpolation]).crop(
        (left, top, left + spec.size, top + spec.size)
    )


def to_uint8(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """What a model exported with export.input=uint8 takes: resized, cropped RGB, uint8 HWC."""
    arr = np.asarray(resize_crop(img, spec), dtype=np.uint8)
    return np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr


def preprocess(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """Resize the shorter side, centre-crop, scale to [0,1], normalise: float32 CHW, 3 channels."""
    return normalise(np.asarray(resize_crop(img, spec)), spec)


def normalise(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resized, cropped pixels (HW grey or HWC RGB, 0-255) -> (x/255 - mean)/std as float32 CHW."""
    arr = pixels.astype(np.float32)
    chw = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # a grey image feeds all 3
    std = np.asarray(spec.std, np.float32)[:, None, None]
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    out = np.empty((3, spec.size, spec.size), np.float32)
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
