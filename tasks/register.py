"""register: the pipeline's MLflow run completed (metrics, reports, the registered ONNX) and finished."""

from __future__ import annotations

from dataclasses import dataclass

from headstart import HeadstartError
from headstart.atomic import write_json
from headstart.calibration import run_metrics
from headstart.config import Params
from headstart.provenance import git_commit, serving_requirements
from headstart.runtime import EXPORT_FILES
from headstart.stages import NAMES
from tasks import _backbone, _inputs

# each stage's report that the run's metrics and tags come from
REPORTS = {
    "prepare": "report.json",
    "validate": "report.json",
    "backbone": "decision.json",
    "domain": "report.json",
    "train_head": "metrics.json",
    "finetune": "decision.json",
    "scratch": "decision.json",
    "select": "decision.json",
    "calibrate": "abstention.json",
    "evaluate": "metrics.json",
}


@dataclass
class RegisterResult:
    run_id: str
    model_name: str
    model_version: str
    model_uri: str
    tracking_uri: str
    experiment_id: str
    registered: bool = True  # False: the model equals the latest version's, which model_version names
    reason: str = ""


def register(cfg: Params, tags: dict[str, str] | None = None, force: bool = False) -> RegisterResult:
    """Log the pipeline run and register its model; a model equal to the latest version's is not
    registered again unless `force`."""
    from headstart.tracking import finish_run, log_curves, log_pipeline_run, onnx_classes, pipeline_record

    parity = _inputs.read_json(cfg, "export", "parity.json")
    if not parity.get("passed"):
        raise HeadstartError("export parity did not pass; refusing to register the model")
    reports = {s: _inputs.read_json(cfg, s, f) for s, f in REPORTS.items()}
    export = cfg.stage_dir("export")
    classes = onnx_classes(export / EXPORT_FILES["fp32"])  # in the order the served model outputs them
    metrics, record = pipeline_record({**reports, "export": parity}, _backbone.name(cfg), classes)
    metrics |= run_metrics(reports["calibrate"], reports["evaluate"].get("abstention"))
    ids = log_pipeline_run(
        cfg,
        metrics,
        {**_stage_artifacts(cfg), "export": export / "parity.json"},
        export / EXPORT_FILES["fp32"],
        {**record, "git_commit": git_commit(), **(tags or {})},
        serving_requirements(),
        [export / EXPORT_FILES[v] for v in parity["registered"] if v != "fp32"],
        classes,
        cfg.register.serving.model_dump(),  # the served pyfunc's model_config
        force=force,
    )
    head = _inputs.read_json(cfg, "train_head", "history.json")
    tuned = _inputs.read_json(cfg, "finetune", "history.json")
    log_curves(cfg, ids["run_id"], [(head, 0), (tuned, len(head))])  # what was not logged live
    scratch = _inputs.read_json(cfg, "scratch", "history.json")
    log_curves(cfg, ids["run_id"], [(scratch, 0)], prefix="scratch_curve")
    write_json(cfg.stage_dir("register") / "run.json", ids)
    finish_run(cfg, ids["run_id"])  # last: until here a retry reuses the run and its version
    return RegisterResult(**ids)


def open_run(cfg: Params, tags: dict[str, str] | None = None, started: float | None = None) -> str:
    """A new MLflow run for this pipeline execution, started at `started` (the flow's start): later
    stages log to it, register finishes it."""
    from headstart.tracking import pipeline_run

    return pipeline_run(cfg, tags=tags, fresh=True, started=started)


def record_failure(cfg: Params, stage: str, error: str, tags: dict[str, str] | None = None) -> str:
    """An MLflow run marked FAILED: the failing stage, the error, and the reports written so far."""
    from headstart.tracking import log_failed_run

    all_tags = {"git_commit": git_commit(), "backbone": _backbone.name(cfg), **(tags or {})}
    return log_failed_run(cfg, stage, error, _stage_artifacts(cfg), all_tags)


def _stage_artifacts(cfg: Params) -> dict:
    """Each finished stage's folder before export (reports, plots, the head's model.pt); the ONNX
    is logged as the model."""
    return {s: cfg.stage_dir(s) for s in NAMES[: NAMES.index("export")] if cfg.stage_dir(s).is_dir()}
