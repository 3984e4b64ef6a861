"""Benchmark (not a test): manifest build (prepare's scan) cold and warm, and validation, in images/s.

python -m benchmarks.manifest [--cases 1000x48 10000x48 1000x300]   # images x pixels; prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from headstart.config import MinPerSplit, ValidateParams
from headstart.data.manifest import assign_splits, scan
from headstart.validation import validate_manifest


def make_images(root: Path, n: int, classes: int = 4, size: int = 48) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def run(case: str) -> dict:
    n, size = (int(v) for v in case.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        make_images(data, n, size=size)
        timings = {}
        for phase in ("cold", "warm"):
            start = time.perf_counter()
            manifest = scan(data, [".png"], cache)
            timings[phase] = time.perf_counter() - start
        manifest["split"] = assign_splits(manifest, 0.15, 0.2, seed=0)
        start = time.perf_counter()
        # the rate is the point here: tiny random classes need not draw a val/test image by hash
        lenient = ValidateParams(min_per_class=1, min_per_split=MinPerSplit(train=1, val=0, test=0))
        report = validate_manifest(manifest, lenient, docs_dir=Path(tmp) / "docs").report
        validate_s = time.perf_counter() - start
    return {
        "images": n,
        "pixels": f"{size}x{size}",
        "scan_cold_images_per_s": round(n / timings["cold"], 1),
        "scan_warm_images_per_s": round(n / timings["warm"], 1),
        "validate_s": round(validate_s, 2),
        "validate_images_per_s": round(n / validate_s, 1),
        "validation_success": report["success"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["1000x48", "10000x48", "1000x300"])
    args = ap.parse_args()
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()}
    print(
        json.dumps(
            {"benchmark": "manifest", "machine": machine, "results": [run(c) for c in args.cases]}, indent=2
        )
    )


if __name__ == "__main__":
    main()
