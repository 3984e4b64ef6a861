"""Benchmark (not a test): the head alone vs fine-tuning, on elpv `type` and `defect`, at two data sizes.

    python -m benchmarks.finetune [--small 200] [--large N] [--tasks type defect] [--device auto]

For each task and size, the pipeline runs in-process up to train_head; then finetune with its gate
forced open (min_train_images=0, so the table also shows what fine-tuning does below the gate),
and evaluate on whichever model the stage kept. Prints one JSON report: training images, whether the
default gate would open, validation accuracy of the head and of the fine-tuned model, the decision,
test accuracy of the head and of the kept model, and wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from headstart.config import FinetuneParams, load_params
from headstart.data.builtin import pull
from headstart.stages import NAMES, get
from tasks.evaluate import evaluate
from tasks.finetune import finetune


def run(task: str, per_class: int | None, root: Path, cache: Path, device: str, extra=()) -> dict:
    data = root / "data"
    counts = pull("elpv", data, task=task, per_class=per_class)
    base = [
        f"prepare.data_dir={data}",
        f"project.artifacts_dir={root / 'artifacts'}",
        f"project.cache_dir={cache}",
        "domain.on_mismatch=continue",
        "scratch.run=never",  # this benchmark measures fine-tuning alone
        # fine-tuning is judged on a val split the head never trained on: no refit on train+val
        "train_head.search.cv_max_images=0",
        f"finetune.device={device}",
        *extra,
    ]
    cfg = load_params(None, [*base, "finetune.enabled=false"])
    times = {}
    for name in NAMES[: NAMES.index("finetune") + 1]:  # the pipeline up to fine-tuning
        start = time.perf_counter()
        get(name).function(cfg)
        times[name] = round(time.perf_counter() - start, 1)
    for name in ("scratch", "select", "calibrate"):  # scratch.run=never: select passes transfer on
        get(name).function(cfg)
    head_test = evaluate(cfg).accuracy
    tuned_cfg = load_params(None, [*base, "finetune.min_train_images=0"])
    start = time.perf_counter()
    decision = finetune(tuned_cfg)
    times["finetune"] = round(time.perf_counter() - start, 1)
    for name in ("scratch", "select", "calibrate"):
        get(name).function(tuned_cfg)
    kept_test = evaluate(tuned_cfg).accuracy
    d = json.loads((tuned_cfg.stage_dir("finetune") / "decision.json").read_text())
    return {
        "task": task,
        "images": counts,
        "n_train": d["gate"]["n_train"],
        "default_gate_open": d["gate"]["n_train"] >= FinetuneParams().min_train_images,
        "val_accuracy_head": round(d["val_accuracy_head_only"], 4),
        "val_accuracy_finetuned": round(d["val_accuracy_finetuned"], 4),
        "finetuned_kept": decision.finetuned,
        "test_accuracy_head": round(head_test, 4),
        "test_accuracy_kept_model": round(kept_test, 4),
        "finetune_epochs": d["epochs_run"],
        "finetune_device": d["device"],
        "wall_s": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=200, help="images per class below the gate")
    ap.add_argument("--large", type=int, default=None, help="images per class above it (default: all)")
    ap.add_argument("--tasks", nargs="+", default=["type", "defect"])
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    report = {
        "benchmark": "finetune",
        "machine": {
            "cpus": os.cpu_count(),
            "cuda": torch.cuda.is_available(),
            "python": platform.python_version(),
        },
        "finetune_params": FinetuneParams().model_dump(),
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for task in args.tasks:
            for per_class in (args.small, args.large):
                root = Path(tmp) / f"{task}-{per_class or 'all'}"
                report["runs"].append(run(task, per_class, root, cache, args.device))
                print(json.dumps(report["runs"][-1]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
