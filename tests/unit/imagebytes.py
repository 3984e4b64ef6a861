"""Image files of every awkward kind, as bytes: shared by the probe and the validation tests."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw


def noise(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """Seeded RGB noise: every seed has its own content and an unrelated perceptual hash."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def scene(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """Seeded flat shapes: a photo-like image whose perceptual hash survives resizing and JPEG."""
    rng = np.random.default_rng(seed)

    def colour():
        return tuple(int(c) for c in rng.integers(0, 256, 3))

    img = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        draw.ellipse([x, y, x + int(rng.integers(10, 50)), y + int(rng.integers(10, 50))], fill=colour())
    return img


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    return encode(noise(seed, size), "PNG")


def jpeg(seed: int, size: tuple[int, int] = (48, 40), quality: int = 90) -> bytes:
    return encode(noise(seed, size), "JPEG", quality=quality)


def rgba(seed: int) -> bytes:
    img = noise(seed).convert("RGBA")
    img.putalpha(128)
    return encode(img, "PNG")


def palette_transparent(seed: int) -> bytes:
    return encode(noise(seed).convert("P"), "PNG", transparency=0)


def grey(seed: int) -> bytes:
    return encode(noise(seed).convert("L"), "PNG")


def grey16(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16)), "PNG")


def cmyk_jpeg(seed: int) -> bytes:
    return encode(noise(seed).convert("CMYK"), "JPEG", quality=90)


def animated_gif(seed: int, frames: int = 3) -> bytes:
    first, *rest = (noise(seed + i) for i in range(frames))
    return encode(first, "GIF", save_all=True, append_images=rest, duration=100, loop=0)


def exif_rotated_jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """Stored landscape with EXIF orientation 6 (rotate 90°): shown, and decoded, as portrait."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(noise(seed, size), "JPEG", quality=90, exif=exif)


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny PNG whose IHDR claims width x height: a decompression bomb's header."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"  # 8-byte signature, 4-byte length, then the chunk type
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over type + 13 data bytes
    return bytes(data)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
TEXT = b"this is a text file, saved with an image's name\n"
