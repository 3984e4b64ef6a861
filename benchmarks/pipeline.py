"""Benchmark (not a test): the demo pipeline's wall time and peak memory, stage by stage.

    python -m benchmarks.pipeline [--per-class 400]   # prints one JSON report

Each stage runs as `headstart stage NAME` in its own process (what dvc repro does), so each figure
includes that process's imports; then the whole Prefect flow (`headstart run`) cold and warm, and the
fixed cost of the machinery: importing torch, Prefect, MLflow, GX, and `headstart --help`; and
issue 18's table (`issue_18`): the warm export stage (the median of three runs), the unchanged
flow and the flow's peak RSS, each before, today and its goal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.features import measured
from headstart.stages import NAMES as STAGES  # the stages `headstart stage` runs, in pipeline order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=400, help="elpv defect images per class (demo: 400)")
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    headstart = str(bin_dir / "headstart")
    report = {
        "benchmark": "pipeline",
        "machine": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
        measured(
            [headstart, "data", "pull", "elpv", "--out", "data/raw", "--per-class", str(args.per_class)],
            cwd=tmp,
        )
        report["images"] = 2 * args.per_class
        report["stages_cold"] = {s: measured([headstart, "stage", s], cwd=tmp) for s in STAGES}
        report["stages_warm"] = {s: measured([headstart, "stage", s], cwd=tmp) for s in STAGES}
        # issue 18's export figure is the median of three warm runs: one sample on 2 shared cores
        # moved by a second from one benchmark to the next
        report["export_warm_repeats"] = [measured([headstart, "stage", "export"], cwd=tmp) for _ in range(2)]
        # every stage runs (the stages above ran without the flow, so none has a reuse record yet)...
        report["flow_warm"] = measured([headstart, "run"], cwd=tmp)
        # ...then nothing changed: every stage but prepare, register and promote is reused
        report["flow_unchanged"] = measured([headstart, "run"], cwd=tmp)
        more = tmp / "data" / "raw" / "functional"
        for i, src in enumerate(sorted(more.glob("*.png"))[: args.per_class // 5]):  # +10% images
            (more / f"copy_{i}.png").write_bytes(_flip(src))
        report["stages_after_adding_10_percent"] = {
            s: measured([headstart, "stage", s], cwd=tmp) for s in STAGES
        }
    report["issue_18"] = goals(report)
    py = sys.executable
    report["fixed_costs"] = {
        "import_torch": measured([py, "-c", "import torch"]),
        "import_prefect": measured([py, "-c", "import prefect"]),
        "import_mlflow": measured([py, "-c", "import mlflow"]),
        "import_great_expectations": measured([py, "-c", "import great_expectations"]),
        "headstart_help": measured([headstart, "--help"]),
    }
    print(json.dumps(report, indent=2))


# issue 18's figures before its work (the demo, 2 idle cores) and its goals: (before, goal)
BEFORE_AND_GOAL = {
    "export_stage_warm_s": ("33.6-36.9", 8.0),
    "flow_unchanged_s": ("59.3 (every stage ran)", 20.0),
    "flow_peak_rss_mb": ("2,392", 1300),
    # the same flow's processes summed at one moment (its Prefect server, a stage in a child process):
    # not measured before the issue; held to the same goal
    "flow_peak_tree_rss_mb": ("-", 1300),
}


def goals(report: dict) -> dict:
    """Issue 18's table: each figure before, today (this run) and its goal, and whether it is met.
    The flow's peak is the warm flow's (every stage runs), the larger of the two flows: the largest
    process's (GNU time, as before the issue) and the process tree's sum."""
    today = {
        "export_stage_warm_s": statistics.median(
            [report["stages_warm"]["export"]["s"]] + [r["s"] for r in report.get("export_warm_repeats", [])]
        ),
        "flow_unchanged_s": report["flow_unchanged"]["s"],
        "flow_peak_rss_mb": max(report[k]["peak_rss_mb"] or 0 for k in ("flow_warm", "flow_unchanged")),
        "flow_peak_tree_rss_mb": max(
            report[k]["peak_tree_rss_mb"] or 0 for k in ("flow_warm", "flow_unchanged")
        ),
    }
    return {
        k: {"before": before, "today": today[k], "goal": goal, "met": today[k] <= goal}
        for k, (before, goal) in BEFORE_AND_GOAL.items()
    }


def _flip(path: Path) -> bytes:
    """A new image (mirrored): new content, so the cache cannot know it."""
    import io

    from PIL import Image, ImageOps

    buf = io.BytesIO()
    ImageOps.mirror(Image.open(path)).save(buf, "PNG")
    return buf.getvalue()


if __name__ == "__main__":
    main()
