"""Benchmark (not a test): the registered model served by `mlflow models serve` vs the in-process
Predictor, under the same bounded load.

    python -m benchmarks.serving [--clients 8] [--requests 300] [--quick]   # prints one JSON report

Lite0 with a new 2-class head is registered (as the pipeline's register stage does: the image-in
pyfunc) in a temporary MLflow store and served on loopback (--env-manager local, one worker). Each of
`clients` threads sends `requests` requests of one real elpv PNG (base64 in dataframe_split JSON)
and times each answer: p50/p95/p99 latency and images/s over the whole run. The same threads then
call Predictor.predict_bytes in process on the same images: the difference is the price of HTTP,
JSON and MLflow. The server's resident memory (its whole process group) is read after a warm-up at
the same concurrency and again at the end: flat means no growth per request.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.features import BACKBONE, elpv_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=300, help="requests per client (one image each)")
    ap.add_argument("--quick", action="store_true", help="25 requests per client")
    args = ap.parse_args()
    print(json.dumps(run(args.clients, 25 if args.quick else args.requests), indent=2))


def run(clients: int, requests_each: int) -> dict:
    from headstart.ops.model_server import served
    from headstart.runtime import Predictor

    os.environ.pop("MLFLOW_TRACKING_URI", None)  # it would win over the temporary store: never the user's
    report = {
        "benchmark": "serving",
        "machine": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "model": f"{BACKBONE} + 2-class head, fp32 ONNX on the CPU",
        "load": {"clients": clients, "requests_per_client": requests_each, "images_per_request": 1},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        onnx_file = _export(tmp)
        blobs = [p.read_bytes() for p in elpv_images(tmp / "elpv", 32)]
        model_uri, store = _register(tmp, onnx_file)
        with served(model_uri, store, tmp / "serve.log") as (url, pid):
            # warm-up at the same concurrency: onnxruntime's arena grows to the concurrent runs once
            load(lambda b: _post(url, b), blobs, clients, 2)
            rss_start = group_rss_mb(pid)
            report["served"] = load(lambda b: _post(url, b), blobs, clients, requests_each)
            report["server_rss_mb"] = {"start": rss_start, "end": group_rss_mb(pid)}
        predictor = Predictor(onnx_file, providers="cpu")
        report["in_process"] = load(lambda b: _local(predictor, b), blobs, clients, requests_each)
    report["served_vs_in_process_images_per_s"] = round(
        report["served"]["images_per_s"] / report["in_process"]["images_per_s"], 2
    )
    return report


def load(call, blobs: list[bytes], clients: int, requests_each: int) -> dict:
    """`clients` threads, each making `requests_each` calls (one image each, cycling through blobs)."""

    def client(c: int) -> list[float]:
        times = []
        for i in range(requests_each):
            start = time.perf_counter()
            call(blobs[(c * requests_each + i) % len(blobs)])
            times.append(time.perf_counter() - start)
        return times

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        times = [t for ts in pool.map(client, range(clients)) for t in ts]
    wall = time.perf_counter() - start
    p50, p95, p99 = np.percentile(times, [50, 95, 99]) * 1e3
    return {
        "requests": len(times),
        "p50_ms": round(p50, 1),
        "p95_ms": round(p95, 1),
        "p99_ms": round(p99, 1),
        "images_per_s": round(len(times) / wall, 1),
    }


def _post(url: str, blob: bytes) -> None:
    import requests

    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(blob).decode()]]}}
    r = requests.post(f"{url}/invocations", json=body, timeout=120)
    if r.status_code != 200:
        raise RuntimeError(f"the server answered {r.status_code}: {r.text[:200]}")


def _local(predictor, blob: bytes) -> None:
    (result,) = predictor.predict_bytes([blob], workers=1)
    if result.error:
        raise RuntimeError(result.error)


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the group (mlflow's CLI, uvicorn and its worker)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ..., rss (the 22nd)
            total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return round(total / 2**20, 1)


def _export(tmp: Path) -> Path:
    import torch

    from headstart.backbones import load_backbone
    from headstart.export import export_onnx
    from headstart.training import Classifier, make_head

    lite0 = load_backbone(BACKBONE)
    torch.manual_seed(0)
    model = Classifier(lite0.feature_extractor(), make_head(lite0.num_features, 2, 256, 0.0).eval()).eval()
    return export_onnx(model, tmp / "model.onnx", lite0.spec, {"headstart.classes": '["a", "b"]'}, 18)


def _register(tmp: Path, onnx_file: Path) -> tuple[str, str]:
    """The model registered as the register stage does, holding `champion`: (model URI, store URI)."""
    from headstart.config import load_params
    from headstart.provenance import serving_requirements
    from headstart.tracking import Registry, log_pipeline_run

    store = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_params(
        None,
        [
            f"project.artifacts_dir={tmp / 'artifacts'}",
            f"mlflow.tracking_uri={store}",
            f"mlflow.artifact_location={tmp / 'mlruns'}",
            "register.model_name=bench",
        ],
    )
    ids = log_pipeline_run(cfg, {}, {}, onnx_file, {}, serving_requirements())
    Registry(cfg, "bench").set_alias("champion", ids["model_version"])
    return "models:/bench@champion", store


if __name__ == "__main__":
    main()
