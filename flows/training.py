"""The Prefect flow `training`: which stages run, in what order; the stages themselves live in tasks/."""

from __future__ import annotations

import logging

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from headstart import HeadstartError
from headstart.config import load_params
from tasks.domain import domain
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.finetune import finetune
from tasks.prepare import prepare
from tasks.promote import promote
from tasks.register import record_failure, register
from tasks.train_head import train_head
from tasks.validate import validate


class _NoTracebackForUserErrors(logging.Filter):
    """A HeadstartError (bad data, bad params, a failed gate) is logged as its message, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HeadstartError):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_NoTracebackForUserErrors())


# (stage, function, key of the Prefect markdown artifact made from its summary.md)
STAGES = (
    ("prepare", prepare, None),
    ("validate", validate, "data-validation"),
    ("domain", domain, "domain-check"),
    ("train_head", train_head, None),
    ("finetune", finetune, "finetune-decision"),
    ("evaluate", evaluate, None),
    ("export", export, None),
)


def _stage(fn):
    # caching is DVC's and the feature cache's job; Prefect gives retries, logs, state and the UI
    return task(fn, name=fn.__name__, cache_policy=NO_CACHE)


@flow(name="training", log_prints=True)
def training(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """prepare -> validate -> domain -> train_head -> finetune (gated) -> evaluate -> export -> register
    -> promote."""
    log = get_run_logger()
    cfg = load_params(params_file, overrides)
    tags = {"prefect.flow_run_id": str(flow_run.id)}
    results = {}
    for stage, fn, artifact in STAGES:
        try:
            results[stage] = _stage(fn)(cfg)
            log.info("%s: %s", stage, results[stage])
        except Exception as exc:
            _record(cfg, stage, exc, tags)
            raise
        finally:
            if artifact:
                _publish(cfg, stage, artifact)
    results["register"] = _stage(register)(cfg, tags=tags)  # its own failure has no run to mark
    if cfg.promote.enabled:
        try:
            results["promote"] = _stage(promote)(cfg)
            log.info("promote: %s", results["promote"])
        finally:
            _publish(cfg, "promote", "promotion")
    return {**{k: v.__dict__ for k, v in results.items()}, "artifacts_dir": str(cfg.project.artifacts_dir)}


def _record(cfg, stage: str, exc: Exception, tags: dict[str, str]) -> None:
    """Mark the failure in MLflow; a tracking store that is down must not hide the original error."""
    log = get_run_logger()
    error = str(exc) if isinstance(exc, HeadstartError) else f"{type(exc).__name__}: {exc}"
    try:
        run_id = _stage(record_failure)(cfg, stage, error, tags)
        log.error("stage %s failed; MLflow run %s marked FAILED", stage, run_id)
    except Exception as tracking_error:
        log.warning("stage %s failed and MLflow could not record it: %s", stage, tracking_error)


def _publish(cfg, stage: str, key: str) -> None:
    """A stage's summary as a Prefect markdown artifact, so the UI tells the story."""
    summary = cfg.stage_dir(stage) / "summary.md"
    if summary.exists():
        create_markdown_artifact(markdown=summary.read_text(), key=key, description=f"headstart {stage}")
