"""Built-in data sets, materialised as an image folder `<out>/<class>/<file>.png`, deterministically.

They come from installed packages (nothing is downloaded, nothing is vendored in this repository):
- elpv: 2,624 electroluminescence images of solar cells (PyPI `elpv-dataset`, CC BY-NC-SA 4.0).
  task `defect`: functional (defect probability 0) vs defective (>= 2/3); task `type`: mono vs poly.
- lfw: scikit-image's `lfw_subset`, 100 face and 100 non-face 25x25 crops.
"""

from __future__ import annotations

import hashlib
import io
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from headstart import HeadstartError
from headstart.atomic import directory

DATASETS = ("elpv", "lfw")


def pull(
    name: str, out: str | Path, task: str = "defect", per_class: int | None = None, seed: int = 0
) -> dict[str, int]:
    """Materialise a built-in data set into `out` (which must be empty); returns images per class."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise HeadstartError(f"{out} is not empty; pull into an empty or new folder")
    if per_class is not None and per_class < 1:
        raise HeadstartError("--per-class must be at least 1")
    if name == "elpv":
        items = _elpv_items(task)
    elif name == "lfw":
        items = _lfw_items()
    else:
        raise HeadstartError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    chosen = _choose(items, per_class, seed)
    with directory(out, mark=False) as tmp:
        for label, filename, data in chosen:
            (tmp / label).mkdir(exist_ok=True)
            (tmp / label / filename).write_bytes(data())
    counts: dict[str, int] = {}
    for label, _, _ in chosen:
        counts[label] = counts.get(label, 0) + 1
    return counts


def _choose(items, per_class: int | None, seed: int):
    """The same `per_class` images per class for the same seed, chosen by hashing the file names."""
    by_label: dict[str, list] = {}
    for item in items:
        by_label.setdefault(item[0], []).append(item)
    chosen = []
    for label in sorted(by_label):
        ranked = sorted(
            by_label[label], key=lambda it: hashlib.sha256(f"{seed}:{it[1]}".encode()).hexdigest()
        )
        chosen += ranked[:per_class] if per_class else ranked
    return chosen


def _elpv_items(task: str):
    if task not in ("defect", "type"):
        raise HeadstartError(f"elpv task {task!r}: choose defect or type")
    root = resources.files("elpv_dataset") / "data"
    items = []
    for line in (root / "labels.csv").read_text().splitlines():
        if not line.strip():
            continue
        rel, prob, cell_type = line.split()
        p = float(prob)
        if task == "type":
            label = cell_type
        elif p == 0.0:
            label = "functional"
        elif p >= 2 / 3 - 1e-9:
            label = "defective"
        else:
            continue  # uncertain labels (p = 1/3) are left out of the defect task
        source = root / rel
        items.append((label, Path(rel).name, source.read_bytes))
    return items


def _lfw_items():
    from skimage.data import lfw_subset

    images = lfw_subset()  # first 100 faces, then 100 non-faces
    items = []
    for i, img in enumerate(images):
        label = "face" if i < len(images) // 2 else "non_face"
        items.append((label, f"{label}_{i:03d}.png", _png_bytes_fn(img)))
    return items


def _png_bytes_fn(img: np.ndarray):
    def encode() -> bytes:
        buf = io.BytesIO()
        Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    return encode
