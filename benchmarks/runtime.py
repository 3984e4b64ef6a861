"""Benchmark (not a test): serving speed of an exported model, torch vs onnxruntime, and `predict`.

    python -m benchmarks.runtime [--images 256] [--repeats 20] [--demo-per-class 400]   # one JSON report

The model is Lite0 with a new 2-class head (the head's weights do not change the speed). For batch 1
and 32: images/s and p50/p95 latency per batch for torch eager (fp32, NCHW, inference_mode),
onnxruntime on the CPU, and its INT8 variant (headstart.quantize, calibrated on 128 elpv images);
then `Predictor.predict_files` end to end on a folder of real elpv PNGs (decoding included);
`demo_int8`: the demo's stages up to export (elpv defect, --demo-per-class images per class; 0 skips
it), the INT8 gate's figures on its test images and what INT8 adds to the export stage. Where torch
sees a GPU: torch CUDA fp32 and fp16, and onnxruntime CUDA and TensorRT on the fp32 and fp16 ONNX files
where those providers load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.features import BACKBONE, elpv_images, measured
from headstart.backbones import load_backbone
from headstart.export import export_onnx
from headstart.quantize import quantize_int8
from headstart.runtime import Predictor, _loadable
from headstart.stages import NAMES as STAGES
from headstart.training import Classifier, make_head

CALIBRATION = 128  # export.int8_calibration_images


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
    ap.add_argument("--demo-per-class", type=int, default=400, help="demo images per class (0: skip)")
    args = ap.parse_args()
    report = run(args.images, args.repeats)
    if args.demo_per_class:
        report["demo_int8"] = demo_int8(args.demo_per_class)
    print(json.dumps(report, indent=2))


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
        paths = elpv_images(tmp / "elpv", max(n_images, 2 * CALIBRATION))
        int8 = tmp / "model_int8.onnx"
        start = time.perf_counter()
        report["int8_quantize"] = quantize_int8(fp32, int8, paths[-CALIBRATION:]) | {
            "s": round(time.perf_counter() - start, 1)
        }
        ort_cpu, ort_int8 = Predictor(fp32, providers="cpu"), Predictor(int8, providers="cpu")
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
            row["onnxruntime_cpu_int8"] = timed(ort_int8.logits, x, repeats)
            row["int8_vs_fp32"] = round(
                row["onnxruntime_cpu_int8"]["images_per_s"] / row["onnxruntime_cpu"]["images_per_s"], 2
            )
            if torch.cuda.is_available():
                row.update(_gpu(model, fp32, fp16, x, repeats))
            report["batch"][str(bs)] = row
        paths = paths[:n_images]
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


def demo_int8(per_class: int) -> dict:
    """The demo's stages up to export (each `headstart stage`, as DVC runs them) with the INT8 variant,
    its gate's figures on the demo's real images, and export timed without and with it."""
    headstart = str(Path(sys.executable).parent / "headstart")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
        pull = [
            "data",
            "pull",
            "elpv",
            "--task",
            "defect",
            "--out",
            "data/raw",
            "--per-class",
            str(per_class),
        ]
        measured([headstart, *pull], cwd=tmp)
        for stage in STAGES[: STAGES.index("export")]:
            measured([headstart, "stage", stage], cwd=tmp)
        timings = {
            f"export_int8_{flag}": measured(
                [headstart, "stage", "export", "--set", f"export.int8={flag}"], cwd=tmp
            )
            for flag in ("false", "true")
        }
        figures = json.loads((tmp / "artifacts" / "export" / "parity.json").read_text())["variants"]
    keep = ("n_images", "n_labelled", "max_abs_logit_diff", "top1_agreement", "decisive_top1_agreement")
    keep += ("near_ties", "accuracy_torch", "max_metric_diff", "decisive_metric_diff", "ood_decision_flips")
    int8 = figures["int8"]
    return {
        "images": 2 * per_class,
        **timings,
        "int8": {k: int8[k] for k in keep if k in int8}
        | {k: int8[k] for k in ("calibration_images", "calibration_skipped", "passed", "failures")},
        "int8_accuracy_per_batch": {b: v["accuracy_onnx"] for b, v in int8["batch_sizes"].items()},
        "fp16_max_abs_logit_diff": figures.get("fp16", {}).get("max_abs_logit_diff"),
    }


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
