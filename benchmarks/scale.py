"""Benchmark (not a test): feature extraction on each engine.runner, and what a shard costs.

    python -m benchmarks.scale [--data /tmp/scaledemo/raw] [--images 0] [--markdown]   # JSON report

- images/s of extraction (decoding included, cold cache) with runner local (this process), process
  (Prefect's ProcessPoolTaskRunner, 2 workers) and dask (a LocalCluster, 2 workers x 1 thread), on the
  same real images (elpv, pulled into --data when absent) and the real EfficientNet-Lite0 weights;
  the features of every runner must be bit-identical to local's (asserted);
- the fixed cost of a sharded run (Prefect API, worker start-up, one session per worker) and the
  per-shard overhead (scheduling and serialisation): the time of many empty shards less one;
- the manifest scan's rate (content hashes, one process): the serial step before any shard.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from flows.shards import run
from headstart.backbones import load_backbone
from headstart.config import EngineParams
from headstart.data.manifest import scan
from headstart.features import Features, backbone_onnx
from headstart.shards import Job

BACKBONE = "efficientnet_lite0"
RUNNERS = ("local", "process", "dask")


def images(folder: Path, n: int) -> tuple[list[Path], list[str], float]:
    """(paths, content hashes, scan images/s) of the folder's images (elpv defect pulled if absent)."""
    if not folder.exists():
        from headstart.data.builtin import pull

        pull("elpv", folder, task="defect", per_class=600)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        m = scan(folder, [".png"], Path(tmp))
        rate = len(m) / (time.perf_counter() - start)
    m = m.sort_values("path").head(n) if n else m
    return [folder / p for p in m["path"]], list(m["sha256"]), rate


def extract(backbone, runner: str, paths, shas, work: Path, p: dict) -> tuple[np.ndarray, float]:
    """Features and wall seconds of one cold extraction on `runner` (the ONNX engine pre-exported)."""
    cache = work / runner
    shutil.copytree(work / "engines", cache / "engines")
    params = EngineParams(runner=runner, **p) if runner != "local" else None
    features = Features(backbone, "onnxruntime", cache, 32, runner=params, run_shards=run)
    start = time.perf_counter()
    x, computed = features(paths, shas)
    assert computed == len(set(shas))
    return x, time.perf_counter() - start


def shard_overhead(backbone, onnx: Path, work: Path, runner: str, p: dict, n: int = 40) -> dict:
    """Seconds of a sharded run of 1 empty shard (the fixed cost) and per extra empty shard."""
    job = Job(str(onnx), str(work / "empty"), "k", backbone.num_features, backbone.spec, 32, 1)
    params = EngineParams(runner=runner, **p)
    timed = []
    for count in (1, n + 1):
        start = time.perf_counter()
        run(job, [[] for _ in range(count)], params)
        timed.append(time.perf_counter() - start)
    return {"fixed_s": round(timed[0], 2), "per_shard_ms": round(1000 * (timed[1] - timed[0]) / n, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/scaledemo/raw"))
    ap.add_argument("--images", type=int, default=0, help="first N images by path (0: all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--markdown", action="store_true", help="also print the README table")
    args = ap.parse_args()
    print(json.dumps(report(args.data, args.images, args.workers, args.shard_size, args.markdown), indent=2))


def report(data: Path, n: int, workers: int, shard_size: int, markdown: bool = False) -> dict:
    paths, shas, scan_rate = images(data, n)
    backbone = load_backbone(BACKBONE)
    p = {"workers": workers, "threads": max(1, (os.cpu_count() or 1) // workers), "shard_size": shard_size}
    rows, reference = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        onnx = backbone_onnx(backbone, work)  # work/engines: every runner's cache starts from a copy
        export_s = time.perf_counter() - start
        for runner in RUNNERS:
            x, seconds = extract(backbone, runner, paths, shas, work, p)
            if reference is None:
                reference = x
            assert np.array_equal(x, reference), f"{runner}'s features differ from local's"
            rows[runner] = {"seconds": round(seconds, 2), "images_per_s": round(len(paths) / seconds, 1)}
        for runner in RUNNERS[1:]:
            rows[runner] |= shard_overhead(backbone, onnx, work, runner, p)
    result = {
        "benchmark": "scale",
        "cpus": os.cpu_count(),
        "note": "shared cores (other jobs ran beside it): rates are lower bounds, ratios approximate",
        "backbone": BACKBONE,
        "images": len(paths),
        "engine": p,
        "onnx_export_s": round(export_s, 2),
        "scan_images_per_s": round(scan_rate, 1),
        "bit_identical": True,
        "runners": rows,
    }
    if markdown:
        print(table(result))
    return result


def table(r: dict) -> str:
    lines = [
        "| runner | images/s | wall s | fixed cost s (empty run) | per-shard overhead ms |",
        "|---|---|---|---|---|",
    ]
    for name, row in r["runners"].items():
        fixed, per = row.get("fixed_s", "-"), row.get("per_shard_ms", "-")
        lines.append(f"| {name} | {row['images_per_s']} | {row['seconds']} | {fixed} | {per} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
