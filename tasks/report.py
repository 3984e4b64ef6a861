"""report: the run report, one self-contained HTML page of what every stage found (headstart.report),
logged to the pipeline's MLflow run. The flow also writes it for a failed run, headed by why."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from headstart import HeadstartError
from headstart.atomic import directory, write_json, write_text
from headstart.config import Params
from headstart.report import Run, build
from headstart.stages import NAMES

FAILURE = "failure.json"  # a failed run's stage and error, kept so `headstart report` rebuilds it alike


@dataclass
class ReportResult:
    path: str
    bytes: int
    thumbnails: int
    seconds: float
    mlflow_run_id: str | None = None  # the run it was logged to, None when not logged


def report(
    cfg: Params, failed: str | None = None, error: str | None = None, log: bool = True
) -> ReportResult:
    """artifacts/report/index.html from what the stages wrote; `failed`/`error`: the run stopped there."""
    started = time.time()
    run = Run(cfg.project.artifacts_dir, cfg.prepare.data_dir, NAMES, failed, error, cfg.validate)
    page = build(run)
    final = cfg.stage_dir("report")
    index = final / "index.html"
    with directory(final) as out:
        write_text(out / "index.html", page)
        write_text(
            out / "summary.md",
            f"# Run report\n\n{_status(failed)}: [{index.resolve()}]({index.resolve().as_uri()})\n",
        )
        if failed:
            write_json(out / FAILURE, {"stage": failed, "error": error})
    run_id = _log(cfg, final) if log else None
    return ReportResult(
        str(index), len(page.encode()), run.thumbnails, round(time.time() - started, 2), run_id
    )


def recorded_failure(cfg: Params) -> tuple[str | None, str | None]:
    """The failed stage and error the last report recorded, for a rebuild (None, None after a success)."""
    try:
        d = json.loads((cfg.stage_dir("report") / FAILURE).read_text(encoding="utf-8"))
        return d["stage"], d["error"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _status(failed: str | None) -> str:
    return f"the run failed at stage {failed}" if failed else "the run completed"


def _log(cfg: Params, folder) -> str | None:
    """The report on the pipeline's MLflow run; a tracking store that fails costs the log, not the page."""
    from headstart.tracking import log_report

    try:
        return log_report(cfg, folder)
    except HeadstartError as exc:
        logging.getLogger(__name__).warning("the run report was not logged to MLflow: %s", exc)
        return None
