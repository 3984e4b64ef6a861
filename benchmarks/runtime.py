"""Benchmark (not a test): serving speed of an exported model, torch vs onnxruntime, and `predict`.

    python -m benchmarks.runtime [--images 256] [--repeats 20]   # prints one JSON report

The model is Lite0 with a new 2-class head (the head's weights do not change the speed). For batch 1
and 32: images/s and p50/p95 latency per batch for torch eager (fp32, NCHW, inference_mode) and
onnxruntime on the CPU; then `Predictor.predict_files` end to end on a folder of real elpv PNGs
(decoding included). Where torch sees a GPU: torch CUDA fp32 and fp16, and onnxruntime CUDA and
TensorRT on the fp32 and fp16 ONNX files where those providers load.
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
import torch

from benchmarks.features import BACKBONE, elpv_images
from headstart.backbones import load_backbone
from headstart.export import export_onnx
from headstart.runtime import Predictor, _loadable
from headstart.training import Classifier, make_head


def timed(fn, x, repeats: int) -> dict:
    """Latency per call (ms, p50/p95) and images/s at the median, after two warm-up calls."""
    fn(x)
    fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    p50, p95 = np.percentile(times, [50, 95])
    return {
        "p50_ms": round(p50 * 1e3, 2),
        "p95_ms": round(p95 * 1e3, 2),
        "images_per_s": round(len(x) / p50, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="images in the predict folder")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per configuration")
    args = ap.parse_args()
    print(json.dumps(run(args.images, args.repeats), indent=2))


def run(n_images: int, repeats: int) -> dict:
    lite0 = load_backbone(BACKBONE)
    torch.manual_seed(0)
    model = Classifier(lite0.feature_extractor(), make_head(lite0.num_features, 2, 256, 0.0).eval()).eval()
    spec, meta = lite0.spec, {"headstart.classes": '["a", "b"]'}
    report: dict = {
        "benchmark": "runtime",
        "machine": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "cuda": torch.cuda.is_available(),
        },
        "model": f"{BACKBONE} + 2-class head",
        "batch": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = export_onnx(model, tmp / "model.onnx", spec, meta, 18)
        fp16 = export_onnx(model, tmp / "model_fp16.onnx", spec, meta, 18, fp16=True)
        ort_cpu = Predictor(fp32, providers="cpu")
        rng = np.random.default_rng(0)
        for bs in (1, 32):
            x = rng.normal(size=(bs, 3, spec.size, spec.size)).astype(np.float32)
            row = {}
            with torch.inference_mode():
                row["torch_eager_cpu"] = timed(lambda a: model(torch.from_numpy(a)), x, repeats)
            row["onnxruntime_cpu"] = timed(ort_cpu.logits, x, repeats)
            row["onnxruntime_cpu_vs_torch_eager"] = round(
                row["onnxruntime_cpu"]["images_per_s"] / row["torch_eager_cpu"]["images_per_s"], 2
            )
            if torch.cuda.is_available():
                row.update(_gpu(model, fp32, fp16, x, repeats))
            report["batch"][str(bs)] = row
        paths = elpv_images(tmp / "elpv", n_images)
        ort_cpu.predict_files(paths[:8])
        start = time.perf_counter()
        results = ort_cpu.predict_files(paths, batch_size=32)
        report["predict_folder"] = {
            "images": len(paths),
            "predicted": sum(r.error is None for r in results),
            "images_per_s": round(len(paths) / (time.perf_counter() - start), 1),
            "providers": ort_cpu.providers,
        }
    return report


def _gpu(model, fp32: Path, fp16: Path, x: np.ndarray, repeats: int) -> dict:
    out = {}
    cuda = model.to("cuda")
    t = torch.from_numpy(x).to("cuda")

    def torch_call(dtype):
        def call(_x):
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype == torch.float16):
                cuda(t)
            torch.cuda.synchronize()

        return call

    out["torch_cuda_fp32"] = timed(torch_call(torch.float32), x, repeats)
    out["torch_cuda_fp16"] = timed(torch_call(torch.float16), x, repeats)
    model.to("cpu")
    for provider, short in (("CUDAExecutionProvider", "cuda"), ("TensorrtExecutionProvider", "tensorrt")):
        if not _loadable(provider):
            out[f"onnxruntime_{short}"] = "provider not loadable here"
            continue
        for name, path in (("fp32", fp32), ("fp16", fp16)):
            predictor = Predictor(path, providers=(provider, "CPUExecutionProvider"))
            key = f"onnxruntime_{short}_{name}"
            if predictor.providers[0] != provider:
                out[key] = f"fell back to {predictor.providers[0]}"
                continue
            out[key] = timed(predictor.logits, x, repeats)
    return out


if __name__ == "__main__":
    main()
