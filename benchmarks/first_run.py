"""Benchmark (not a test): the first answer on few images, stage by stage.

    python -m benchmarks.first_run [--per-class 40]   # prints one JSON report (--markdown: a table)

An 80-image, 2-class folder (elpv's functional and defective cells), `headstart run` with the default
params in a new project, three ways: cold (a machine that has never run headstart: the user's engine
cache empty too), new project (the user's cache holds the exported backbone graphs, as after any
earlier project on this machine), and the same project again with nothing changed. Each is timed
from the command's start to its exit, with its peak RSS (the largest process, GNU time) and the
process tree's; the stages' seconds come from the flow's own log (the time from one stage's end to
the next's, so Prefect's overhead per task is in them); `startup` is the command's start to the flow's
first stage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from benchmarks.features import measured
from headstart.stages import NAMES

GOALS = {"first_champion_s": 30.0, "first_champion_peak_rss_mb": 1300, "unchanged_s": 15.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table after the JSON")
    args = ap.parse_args()
    headstart = str(Path(sys.executable).parent / "headstart")
    report: dict = {"benchmark": "first_run", "cpus": os.cpu_count(), "images": 2 * args.per_class}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        measured([headstart, "data", "pull", "elpv", "--out", str(data), "--per-class", str(args.per_class)])
        env = {**os.environ, "HEADSTART_CACHE": str(tmp / "user-cache")}  # empty: a machine's first run
        for name, project in (("cold", "first"), ("new_project", "second"), ("unchanged", "second")):
            folder = tmp / project
            folder.mkdir(exist_ok=True)
            (folder / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
            run = measured([headstart, "run", "--data", str(data)], cwd=folder, env=env, output=True)
            report[name] = summary(run)
    report["goals"] = {
        "first_champion_s": _goal(report["new_project"]["s"], GOALS["first_champion_s"]),
        "first_champion_s_cold_machine": _goal(report["cold"]["s"], GOALS["first_champion_s"]),
        "first_champion_peak_rss_mb": _goal(
            max(report[k]["peak_rss_mb"] or 0 for k in ("cold", "new_project")),
            GOALS["first_champion_peak_rss_mb"],
        ),
        "unchanged_s": _goal(report["unchanged"]["s"], GOALS["unchanged_s"]),
    }
    print(json.dumps(report, indent=2))
    if args.markdown:
        print(markdown(report))


def _goal(value: float, goal: float) -> dict:
    return {"value": value, "goal": goal, "met": value <= goal}


STAGE_END = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| \w+ +\| Flow run '[^']+' - (\w+): ")
FLOW_START = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| \w+ +\| Flow run '[^']+' - Beginning flow run")


def summary(run: dict) -> dict:
    """Total seconds, peaks, the run's last line, and seconds per stage from the flow's log."""
    text = run["stdout"] + run["stderr"]
    day = datetime.fromtimestamp(run["started"]).date()

    def at(stamp: str) -> float:
        return datetime.combine(day, datetime.strptime(stamp, "%H:%M:%S.%f").time()).timestamp()

    stages, last = {}, None
    for line in text.splitlines():
        if m := FLOW_START.match(line):
            last = at(m[1])
            stages["startup"] = round(last - run["started"], 2)
        elif (m := STAGE_END.match(line)) and m[2] in NAMES and last is not None:
            stages[m[2]] = round(at(m[1]) - last, 2)
            last = at(m[1])
    promotion = re.search(r"promotion +(.*)", text)
    return {
        "s": run["s"],
        "peak_rss_mb": run["peak_rss_mb"],
        "peak_tree_rss_mb": run["peak_tree_rss_mb"],
        "stages_s": stages,
        "promotion": promotion[1] if promotion else None,
    }


def markdown(report: dict) -> str:
    runs = ("cold", "new_project", "unchanged")
    rows = ["| | cold machine | new project | unchanged |", "|---|---|---|---|"]
    rows.append("| **total s** | " + " | ".join(f"**{report[r]['s']}**" for r in runs) + " |")
    for key in ("peak_rss_mb", "peak_tree_rss_mb"):
        rows.append(f"| {key} | " + " | ".join(str(report[r][key]) for r in runs) + " |")
    for stage in ["startup", *NAMES]:
        rows.append(
            f"| {stage} s | " + " | ".join(str(report[r]["stages_s"].get(stage, "-")) for r in runs) + " |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
