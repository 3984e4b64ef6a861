"""Benchmark (not a test; needs a CUDA GPU): torch-CUDA feature extraction and one headstart
fine-tuning epoch on real elpv images, and what this machine's onnxruntime offers on the GPU.

    python -m benchmarks.gpu --data DIR [--weights FILE] [--batch 256] [--out report.json]

DIR is an image folder <class>/<file> (e.g. `headstart data pull elpv --out DIR --per-class 400`).
Prints one JSON report, section by section (a section that fails records its error and the rest
still run: a GPU machine is lent for minutes, so one call must bring back everything it can):

- env: torch, CUDA device, timm, onnxruntime and its providers (a session asked for CUDA, then
  `get_providers()`: onnxruntime-gpu lists CUDA even where it falls back to the CPU);
- extract: the pretrained backbone's pooled features, images/s at fp32, fp16 autocast and fp16
  weights (channels_last), on pixels already on the GPU (the model's speed) and end to end from the
  PNG files (decode threads + copy + model), with fp16's largest difference from fp32;
- finetune: headstart.finetune.fit's epochs at the default finetune params (the last
  `unfreeze` units and the head train on the frozen prefix's outputs, computed once) and with every
  unit unfrozen (the whole network from pixels, what fastai's fine_tune trains), seconds per epoch
  and images/s, AMP as the stage runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from headstart.backbones import BUILTIN, load_backbone
from headstart.config import FinetuneParams
from headstart.features import decoded
from headstart.finetune import fit, partition_backbone, run_prefix
from headstart.training import make_head

REPORT: dict = {"benchmark": "gpu"}
DEVICE = "cuda"  # --device cpu: a smoke run of this script on a machine without a GPU (figures meaningless)


def section(name: str):
    """Run one section into REPORT[name]; an exception is recorded, never fatal."""

    def wrap(fn):
        start = time.perf_counter()
        try:
            REPORT[name] = fn()
        except Exception as exc:  # noqa: BLE001 - a lent GPU call must return what it can
            REPORT[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        REPORT[name + "_wall_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps({name: REPORT[name]}, indent=1), flush=True)
        return fn

    return wrap


def env() -> dict:
    import onnxruntime as ort
    import timm
    from onnx import TensorProto, helper

    out = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "timm": timm.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_available_providers": ort.get_available_providers(),
    }
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 10
    sess = ort.InferenceSession(
        proto.SerializeToString(),
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    out["onnxruntime_session_providers_when_cuda_asked"] = sess.get_providers()
    return out


def images(data: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    classes = sorted(d.name for d in data.iterdir() if d.is_dir())
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(p for p in (data / c).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise SystemExit(f"{data}: no images in <class>/<file> folders")
    return paths, np.asarray(labels), classes


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cuda_seconds(fn, repeats: int) -> float:
    """Mean seconds of fn() on the GPU (CUDA events), after two warm-up calls."""
    for _ in range(2):
        fn()
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def extract(backbone, paths: list[Path], batch: int) -> dict:
    spec, n = backbone.spec, len(paths)
    start = time.perf_counter()
    pixels = np.concatenate([x for _, x in decoded(spec, [(str(p), p) for p in paths], batch, "decode")])
    decode_s = time.perf_counter() - start
    fmt = torch.channels_last
    fp32 = backbone.feature_extractor().to(DEVICE).eval().to(memory_format=fmt)
    half = backbone.feature_extractor().to(DEVICE).eval().half().to(memory_format=fmt)
    gpu = torch.from_numpy(pixels).to(DEVICE).contiguous(memory_format=fmt)
    modes = {
        "fp32": lambda x: fp32(x),
        "fp16_autocast": lambda x: _autocast(fp32, x),
        "fp16_weights": lambda x: half(x.half()),
    }
    out: dict = {
        "images": n,
        "batch": batch,
        "decode_s": round(decode_s, 2),
        "decode_img_s": round(n / decode_s),
    }
    feats = {}
    with torch.inference_mode():
        for name, run in modes.items():

            def every(run=run):
                return [run(gpu[i : i + batch]) for i in range(0, n, batch)]

            s = cuda_seconds(every, 5)
            feats[name] = torch.cat(every()).float()
            t0 = time.perf_counter()  # end to end: decode threads, copy to the GPU, model
            for _, x in decoded(spec, [(str(p), p) for p in paths], batch, "end to end"):
                run(
                    torch.from_numpy(x).to(DEVICE, non_blocking=True).contiguous(memory_format=fmt)
                ).float().cpu()
            sync()
            e2e = time.perf_counter() - t0
            out[name] = {"model_img_s": round(n / s), "end_to_end_img_s": round(n / e2e)}
        for name in ("fp16_autocast", "fp16_weights"):
            d = (feats[name] - feats["fp32"]).abs()
            cos = torch.nn.functional.cosine_similarity(feats[name], feats["fp32"], dim=1)
            out[name]["max_abs_diff_vs_fp32"] = float(d.max())
            out[name]["min_cosine_vs_fp32"] = float(cos.min())
    out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20) if DEVICE == "cuda" else None
    return out


def _autocast(model, x):
    with torch.autocast(DEVICE, dtype=torch.float16 if DEVICE == "cuda" else torch.bfloat16):
        return model(x)


def finetune_epochs(backbone, paths: list[Path], y: np.ndarray, classes: list[str], batch: int) -> dict:
    spec = backbone.spec
    rng = np.random.default_rng(0)
    order = rng.permutation(len(paths))
    cut = int(0.8 * len(order))
    tr, va = order[:cut], order[cut:]
    items = [(str(p), p) for p in paths]
    pixels = np.concatenate([x for _, x in decoded(spec, items, batch, "decode")])
    out = {"train_images": len(tr), "val_images": len(va)}
    for unfreeze in (FinetuneParams().unfreeze, "all"):
        p = FinetuneParams(max_epochs=3, patience=10, unfreeze=unfreeze)
        split = partition_backbone(backbone.feature_extractor(), p.unfreeze, spec.size)
        sync()
        t0 = time.perf_counter()
        batches = [pixels[i : i + 256] for i in range(0, len(pixels), 256)]
        prefixed = (
            run_prefix(split.prefix, batches, DEVICE) if len(split.prefix) else torch.from_numpy(pixels)
        )
        sync()
        prefix_s = time.perf_counter() - t0
        head = make_head(backbone.num_features, len(classes), 0, 0.2)
        yt = torch.from_numpy(y)
        stamps = [time.perf_counter()]
        with tempfile.TemporaryDirectory() as tmp:
            result = fit(
                split,
                head,
                (prefixed[tr], yt[tr]),
                (prefixed[va], yt[va]),
                p,
                0,
                DEVICE,
                None,
                Path(tmp) / "ckpt",
                "bench",
                on_epoch=lambda row, stamps=stamps: (sync(), stamps.append(time.perf_counter())),
            )
        epochs = np.diff(stamps)  # each includes its validation pass and checkpoint write
        out[f"unfreeze_{unfreeze}"] = {
            "units_trained": split.unfrozen,
            "prefix_once_s": round(prefix_s, 2),
            "epoch_s": [round(float(e), 2) for e in epochs],
            "steady_epoch_s": round(float(np.median(epochs[1:] if len(epochs) > 1 else epochs)), 2),
            "train_img_s": round(len(tr) / float(np.median(epochs[1:] if len(epochs) > 1 else epochs))),
            "val_accuracy": [round(r["val_accuracy"], 4) for r in result.history],
            "amp": p.amp,
            "batch_size": p.batch_size,
        }
    out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20) if DEVICE == "cuda" else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="image folder <class>/<file>")
    ap.add_argument("--weights", default=None, help="efficientnet_lite0 weights file (default: packaged)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run only")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    section("env")(env)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark measures one")
    torch.backends.cudnn.benchmark = True
    sha = BUILTIN["efficientnet_lite0"][2] if args.weights else None
    backbone = load_backbone("efficientnet_lite0", args.weights, sha)
    paths, y, classes = images(args.data)
    REPORT["data"] = {"images": len(paths), "classes": classes, "per_class": np.bincount(y).tolist()}
    section("extract")(lambda: extract(backbone, paths, args.batch))
    section("finetune")(lambda: finetune_epochs(backbone, paths, y, classes, args.batch))
    text = json.dumps(REPORT, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
