"""Benchmark (not a test): the frozen backbone's cost, and what the feature cache saves.

    python -m benchmarks.features [--images 256] [--naive-images 64]   # prints one JSON report

- extraction images/s, decoding included: torch eager, torch channels_last, onnxruntime, against a bare
  onnxruntime session on pre-decoded tensors (the ceiling on this machine); onnxruntime and the ceiling
  5 times, alternately, and the median of their ratio;
- a warm re-run (everything cached): seconds and images/s;
- head training for 20 epochs on cached features vs the naive loop that runs the backbone every epoch
  (same images, same seed: the same head, checked);
- peak memory of extraction for N and 10N images (it must not grow with the data set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from headstart.backbones import load_backbone
from headstart.config import TrainHeadParams
from headstart.features import FeatureCache, OrtEngine, TorchEngine, backbone_onnx, extract_features
from headstart.preprocess import load_batch
from headstart.training import fit_head, make_head

BACKBONE = "efficientnet_lite0"
RUNS = 5  # extraction vs the bare ceiling, each run beside its own ceiling: the median is reported


def elpv_images(folder: Path, n: int) -> list[Path]:
    """n real 300x300 solar-cell images from the installed elpv package, as PNG files."""
    from headstart.data.builtin import pull

    pull("elpv", folder, task="type", per_class=(n + 1) // 2)
    return sorted(folder.rglob("*.png"))[:n]


def extraction(paths: list[Path], tmp: Path, runs: int = RUNS) -> dict:
    lite0 = load_backbone(BACKBONE)
    onnx_path = backbone_onnx(lite0, tmp / "engines")
    plain = lite0.feature_extractor()  # torch eager: contiguous NCHW, as most scripts run it

    def eager(x):
        with torch.inference_mode():
            return plain(torch.from_numpy(x)).numpy()

    out = {"torch_eager_images_per_s": round(_rate(eager, lite0.spec, paths, FeatureCache(tmp, "eager")), 1)}
    engine = TorchEngine(lite0.feature_extractor())  # after eager: it moves the weights to channels_last
    out["torch_channels_last_images_per_s"] = round(
        _rate(engine, lite0.spec, paths, FeatureCache(tmp, "cl")), 1
    )
    # the ratio to the ceiling, `runs` times, each extraction next to its own ceiling (the load on
    # a shared machine drifts): its median is the figure, the runs show the spread
    ort, x = OrtEngine(onnx_path), load_batch(paths[:32], lite0.spec)
    ort(x)  # warm-up
    rates, ceilings = [], []
    for r in range(runs):
        rates.append(_rate(ort, lite0.spec, paths, FeatureCache(tmp, f"onnxruntime-{r}")))
        ceilings.append(_ceiling(ort, x, max(1, len(paths) // 32)))
    ratios = [round(a / b, 3) for a, b in zip(rates, ceilings, strict=True)]
    out["onnxruntime_images_per_s"] = round(statistics.median(rates), 1)
    out["bare_onnxruntime_ceiling_images_per_s"] = round(statistics.median(ceilings), 1)
    out["onnxruntime_vs_ceiling"] = statistics.median(ratios)
    out["onnxruntime_vs_ceiling_runs"] = ratios
    shas = [f"onnxruntime-0-{i}" for i in range(len(paths))]
    start = time.perf_counter()
    extract_features(ort, lite0.spec, paths, shas, FeatureCache(tmp, "onnxruntime-0"))
    warm = time.perf_counter() - start
    out["warm_rerun_s"] = round(warm, 3)
    out["warm_rerun_images_per_s"] = round(len(paths) / warm, 1)
    return out


def _rate(engine, spec, paths: list[Path], cache: FeatureCache) -> float:
    """Images/s of extract_features, decoding included, into an empty cache."""
    shas = [f"{cache.dir.name}-{i}" for i in range(len(paths))]
    start = time.perf_counter()
    extract_features(engine, spec, paths, shas, cache, 32, desc=cache.dir.name)
    return len(paths) / (time.perf_counter() - start)


def _ceiling(engine: OrtEngine, x: np.ndarray, reps: int) -> float:
    """Images/s of the bare session on one pre-decoded batch: what extraction could reach here."""
    start = time.perf_counter()
    for _ in range(reps):
        engine(x)
    return len(x) * reps / (time.perf_counter() - start)


def head_training(paths: list[Path], tmp: Path, epochs: int = 20) -> dict:
    """Cached features + 20 epochs of the head, vs the backbone on every batch of every epoch."""
    lite0 = load_backbone(BACKBONE)
    engine = OrtEngine(backbone_onnx(lite0, tmp / "engines"))
    y = np.array([0 if "mono" in p.parts[-2] else 1 for p in paths])
    p = TrainHeadParams(max_epochs=epochs, patience=epochs + 1, batch_size=16, hidden=64)
    start = time.perf_counter()
    feats, _ = extract_features(
        engine,
        lite0.spec,
        paths,
        [f"h{i}" for i in range(len(paths))],
        FeatureCache(tmp, "head"),
        32,
        desc="cached",
    )
    cached_head, _, _ = fit_head(feats, y, feats, y, 2, p, seed=0)
    cached_s = time.perf_counter() - start
    start = time.perf_counter()
    naive_head = naive_fit(engine, lite0, paths, y, p, epochs)
    naive_s = time.perf_counter() - start
    same = all(
        torch.allclose(a, b, atol=1e-4)
        for a, b in zip(cached_head.state_dict().values(), naive_head.state_dict().values(), strict=True)
    )
    return {
        "images": len(paths),
        "epochs": epochs,
        "cached_s": round(cached_s, 2),
        "naive_s": round(naive_s, 2),
        "speedup": round(naive_s / cached_s, 1),
        "same_head_weights": same,
    }


def naive_fit(engine, backbone, paths, y, p: TrainHeadParams, epochs: int):
    """What most tutorials do: decode and run the frozen backbone for every batch of every epoch.
    Same seed, order and updates as fit_head, so the result must be the same head."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    head = make_head(backbone.num_features, 2, p.hidden, p.dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    yt = torch.tensor(y)
    for _ in range(epochs):
        head.train()
        order = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(yt), p.batch_size):
            idx = order[i : i + p.batch_size]
            x = torch.from_numpy(engine(load_batch([paths[j] for j in idx], backbone.spec)))
            opt.zero_grad()
            loss_fn(head(x), yt[idx]).backward()
            opt.step()
    return head.eval()


def measured(cmd: list[str], cwd: Path | None = None, env: dict | None = None, output: bool = False) -> dict:
    """Wall seconds and peak RSS of a command in its own process (GNU time: Linux carries a parent's
    ru_maxrss into an exec'd child, so measuring from this big process would read our own peak), and
    `peak_tree_rss_mb`: the largest sum of RSS over the command and every process under it at one
    moment (sampled every 20 ms; the flow's Prefect server, and any stage run in a child process, are
    there at the same time as the flow, which GNU time's per-process maximum does not add up);
    `output`: with the command's stdout and stderr and when it started (`started`, epoch seconds)."""
    import threading

    timer = ["/usr/bin/time", "-f", "peak_kb=%M"] if Path("/usr/bin/time").exists() else []
    start, started = time.perf_counter(), time.time()
    proc = subprocess.Popen(
        [*timer, *cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    tree = {"peak": 0}
    sampler = threading.Thread(target=_sample_tree, args=(proc, tree, bool(timer)), daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {stderr[-2000:]}")
    peaks = [line for line in stderr.splitlines() if line.startswith("peak_kb=")]
    peak = round(int(peaks[-1][8:]) / 1024) if peaks else None  # None: GNU time not installed
    out = {
        "s": round(time.perf_counter() - start, 2),
        "peak_rss_mb": peak,
        "peak_tree_rss_mb": tree["peak"] or None,
    }
    return out | ({"stdout": stdout, "stderr": stderr, "started": started} if output else {})


def _sample_tree(proc: subprocess.Popen, tree: dict, timed: bool) -> None:
    """The largest RSS sum over `proc` and its descendants, every 20 ms (`timed`: proc is GNU time,
    left out)."""
    try:
        import psutil
    except ImportError:  # a dev dependency: without it, no tree figure
        return
    try:
        root = psutil.Process(proc.pid)
    except psutil.Error:
        return
    while proc.poll() is None:
        total = 0
        try:
            kids = root.children(recursive=True)
        except psutil.Error:
            break
        for q in kids if timed else [root, *kids]:
            try:
                total += q.memory_info().rss
            except psutil.Error:
                pass
        tree["peak"] = max(tree["peak"], round(total / 2**20))
        time.sleep(0.02)


def peak_memory(n: int, tmp: Path) -> dict:
    """Extraction in a fresh process for n and 10n images: its peak RSS must not scale with n."""
    out = {}
    for count in (n, 10 * n):
        code = (
            f"from pathlib import Path; from benchmarks.features import _extract_only; "
            f"_extract_only(Path({str(tmp)!r}), {count})"
        )
        out[f"extract_{count}_images"] = measured([sys.executable, "-c", code])
    return out


def _extract_only(tmp: Path, count: int) -> None:
    """Extraction of `count` synthetic 300x300 images through the onnxruntime engine."""
    folder = tmp / f"mem{count}"
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(folder / f"{i}.png")
        if not paths[-1].exists():
            Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8)).save(paths[-1])
    lite0 = load_backbone(BACKBONE)
    engine = OrtEngine(backbone_onnx(lite0, tmp / "engines"))
    extract_features(
        engine,
        lite0.spec,
        paths,
        [f"m{count}-{i}" for i in range(count)],
        FeatureCache(tmp, f"mem{count}"),
        32,
        desc=f"{count} images",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="images for the extraction figures")
    ap.add_argument("--naive-images", type=int, default=64, help="images for the naive-loop comparison")
    ap.add_argument("--memory-images", type=int, default=64, help="N for the N vs 10N memory check")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = elpv_images(tmp / "elpv", args.images)
        report = {
            "benchmark": "features",
            "machine": {
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "python": platform.python_version(),
                "torch_threads": torch.get_num_threads(),
            },
            "backbone": BACKBONE,
            "extraction": extraction(paths, tmp),
            "head_training": head_training(paths[: args.naive_images], tmp),
            "memory": peak_memory(args.memory_images, tmp),
            "peak_rss_mb_this_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
