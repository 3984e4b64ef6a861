"""The Prefect flow `training`: which stages run, in what order; the stages themselves live in tasks/."""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

import flows.shards  # noqa: F401  (engine.runner process|dask: the shard map on Prefect's task runners)
from headstart import GateFailed, HeadstartError, TransientError, reuse
from headstart.atomic import FAILED, sweep, write_json
from headstart.config import load_params
from headstart.ops.isolate import isolated
from headstart.ops.isolate import prewarm as prewarm_child
from headstart.ops.lock import exclusive
from headstart.ops.memory import release_memory, return_freed_buffers
from headstart.provenance import fingerprint_changes, run_fingerprint
from headstart.stages import STAGES
from tasks.register import open_run, record_failure
from tasks.report import report


class _NoTracebackForUserErrors(logging.Filter):
    """A HeadstartError (bad data, bad params, a failed gate) is logged as its message, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HeadstartError):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_NoTracebackForUserErrors())


def _stage(fn, cfg=None):
    """A stage as a Prefect task: caching is DVC's and the feature cache's job; Prefect gives the
    timeout, retries with backoff for transient failures (never for bad data or params), logs, state
    and the UI."""
    if cfg is None:
        return task(fn, name=fn.__name__, cache_policy=NO_CACHE)
    s = cfg.schedule
    return task(
        fn,
        name=fn.__name__,
        cache_policy=NO_CACHE,
        timeout_seconds=s.timeout_s.get(fn.__name__, s.default_timeout_s),
        retries=s.retries,
        retry_delay_seconds=[s.retry_delay_s * 2**i for i in range(s.retries)] or 0,
        retry_condition_fn=_transient,
    )


def _transient(_task, _run, state) -> bool:
    try:
        exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    except Exception:
        return False
    return isinstance(exc, TransientError)  # a tracking server down or failing (HTTP 5xx), nothing else


@flow(name="training", log_prints=True)
def training(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    skip_unchanged: bool = False,
    force: bool = False,
) -> dict:
    """Every stage of headstart.stages.STAGES in order. One run per project at a time; with
    skip_unchanged (scheduled runs), a run whose data, params, code and library versions equal the
    last successful run's ends after prepare as "skipped"; otherwise the result's "changed" says why
    it retrains (e.g. ["code"]). A stage whose inputs equal those of the run that wrote its outputs
    is not run again (headstart.reuse; "reused" names them), and a model equal to the latest
    registered version is neither registered nor promoted again; `force` runs and registers all."""
    log = get_run_logger()
    return_freed_buffers()  # headstart.ops.memory: a buffer freed inside a stage goes back at once
    prewarm()  # a no-op when `headstart run` started them already
    cfg = load_params(params_file, overrides)
    tags = {"prefect.flow_run_id": str(flow_run.id)}
    state_file = cfg.project.cache_dir / "last_success.json"
    with exclusive(cfg.project.cache_dir / "run.lock", cfg.schedule.lock_wait_s):
        for left in sweep(cfg.project.artifacts_dir):  # holding the lock: their writer is dead
            log.info("removed %s, left by a killed run", left)
        results, changed, started = {}, [], time.time()  # the MLflow run's start is the pipeline's
        reused: dict[str, str] = {}
        for stage in STAGES:
            if stage.optional and not _enabled(cfg, stage.optional):
                continue
            if stage.name == "promote" and not (force or results["register"].registered):
                log.info("promote: skipped: %s", results["register"].reason)
                continue
            try:
                results[stage.name], source = _run_or_reuse(cfg, stage, results, _tags(tags, reused), force)
                release_memory()
                reused |= {stage.name: source} if source else {}
                log.info("%s: %s", stage.name, results[stage.name])
            except Exception as exc:
                if stage.artifact:
                    _publish(cfg, stage.name, stage.artifact, failed=isinstance(exc, GateFailed))
                if stage.name != "promote":  # the run a failed stage leaves is marked FAILED
                    _record(cfg, stage.name, exc, tags)
                if stage.name != "report":
                    _failure_report(cfg, stage.name, exc)
                raise
            if stage.artifact:
                _publish(cfg, stage.name, stage.artifact)
            if stage.name == "register":
                _link(results["register"])
            if stage.name == "prepare" and skip_unchanged and not force:
                skipped, changed = _unchanged(cfg, state_file, results["prepare"].data_hash)
                if not skipped:
                    log.info("retraining: changed since the last success: %s", ", ".join(changed))
                else:
                    log.info("skipped: %s", skipped)
                    create_markdown_artifact(
                        markdown=f"# Skipped: data unchanged\n\n{skipped}\n", key="skipped"
                    )
                    return {
                        "skipped": True,
                        "reason": skipped,
                        "artifacts_dir": str(cfg.project.artifacts_dir),
                    }
            if stage.name == "prepare":  # opened after the skip check: a skipped run leaves no MLflow run
                _stage(open_run, cfg)(cfg, tags=tags, started=started)
        if reused:
            create_markdown_artifact(markdown=_reused_markdown(reused), key="reused")
        reg = results["register"]
        fp = run_fingerprint(cfg, results["prepare"].data_hash)
        write_json(
            state_file,
            {
                **fp,
                "data_hash": results["prepare"].data_hash,
                "flow_run_id": tags["prefect.flow_run_id"],
                "mlflow_run_id": reg.run_id,
                "model_uri": reg.model_uri,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
    out = {k: v.__dict__ for k, v in results.items()}
    return {**out, "artifacts_dir": str(cfg.project.artifacts_dir), "changed": changed, "reused": reused}


def prewarm() -> None:
    """Start the isolated stages' children now (headstart.ops.isolate.prewarm): their imports run
    beside whatever this process does until the stage comes (the CLI: the Prefect server's start)."""
    for stage in STAGES:
        if stage.isolated:
            prewarm_child(stage.target, *stage.warm)


def _run_or_reuse(cfg, stage, results: dict, tags: dict[str, str], force: bool):
    """(the stage's result, None), or (its recorded result, the flow run that wrote it) when its
    inputs equal that run's. Only a stage that ran records its inputs."""
    log = get_run_logger()
    if stage.name in reuse.ALWAYS_RUN:
        kwargs = {"tags": tags, "force": force} if stage.name == "register" else {}
        _ahead_of(stage)
        return _stage(_function(stage), cfg)(cfg, **kwargs), None
    parts = reuse.inputs(cfg, stage, results["prepare"].data_hash)
    record, why = (None, ["--force"]) if force else reuse.previous(cfg, stage, parts)
    if record is not None:
        log.info("%s: skipped: %s", stage.name, reuse.since(record))
        return reuse.result(record), record["flow_run_id"]
    log.info("%s runs: %s", stage.name, "; ".join(why))
    _ahead_of(stage)
    result = _stage(_function(stage), cfg)(cfg)
    if not reuse.remember(cfg, stage, parts, result, str(flow_run.id)):
        log.warning("%s: its result is not plain data, so a later run cannot reuse it", stage.name)
    return result, None


def _ahead_of(stage) -> None:
    """What a stage about to run needs started beside it: the child its figure is drawn in."""
    if stage.draws:
        from headstart import plots

        plots.prewarm()


def _function(stage):
    """What the stage's Prefect task calls: its function, or for an isolated stage the same function in
    a fresh process (the same task name, timeout and retries; its exceptions keep their class)."""
    if not stage.isolated:
        return stage.function
    _import_ahead(stage)
    return isolated(stage.target, f"stage {stage.name}")


_imported_ahead: set[str] = set()


def _import_ahead(stage) -> None:
    """While an isolated stage runs in its child, this process only waits for it: a thread imports
    the modules of the stages after it that run here (torch, onnxruntime, optuna: ~1.5 s on 2 cores
    that the first of them would spend). An import that fails is left to that stage to report."""
    later = STAGES[STAGES.index(stage) + 1 :]
    todo = [
        m for m in (s.target.partition(":")[0] for s in later if not s.isolated) if m not in _imported_ahead
    ]
    _imported_ahead.update(todo)
    if todo:
        # not a daemon: a run that ends sooner (a failed validation) waits for the imports to finish
        # at exit rather than tearing torch down in the middle of its import
        threading.Thread(target=_import_quietly, args=(todo,), name="import-ahead").start()


def _import_quietly(modules: list[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # the stage imports it again and reports what is wrong
            pass


def _tags(tags: dict[str, str], reused: dict[str, str]) -> dict[str, str]:
    """The MLflow run's tags: it says which stages this flow run reused rather than ran."""
    return {**tags, "headstart.reused_stages": ",".join(reused) or "none"}


def _reused_markdown(reused: dict[str, str]) -> str:
    rows = "".join(f"| {name} | {run} |\n" for name, run in reused.items())
    head = "# Reused stages\n\nTheir inputs equal those of the run that wrote their outputs.\n\n"
    return f"{head}| stage | outputs of flow run |\n|---|---|\n{rows}"


def _enabled(cfg, key: str) -> bool:
    section, name = key.split(".")
    return bool(getattr(getattr(cfg, section), name))


def _unchanged(cfg, state_file, data_hash: str) -> tuple[str | None, list[str]]:
    """(why this run can stop now, or None; what changed since the last success otherwise): the
    same data, params, code and libraries as the last success, whose artifacts are still there."""
    if not state_file.exists() or not (cfg.stage_dir("register") / "run.json").exists():
        return None, ["no successful run with its artifacts"]
    last = _last_success(state_file)
    if last is None:
        return None, [f"the record of the last success, {state_file}, is damaged"]
    changed = fingerprint_changes(last.get("parts") or {}, run_fingerprint(cfg, data_hash)["parts"])
    if changed:
        return None, changed
    return (
        f"data hash {data_hash[:12]}, params, code and library versions equal the last successful run's "
        f"(flow run {last['flow_run_id']}, {last['finished_at']}, {last['model_uri']})"
    ), []


def _last_success(state_file) -> dict | None:
    """The last success's record; None, with a warning, when it is damaged (truncated, not JSON, the
    wrong shape): no previous success, so this run retrains and writes a good one."""
    try:
        last = json.loads(state_file.read_text(encoding="utf-8"))
        parts = last.get("parts") or {}
        ok = all(isinstance(parts.get(k, {}), dict) for k in ("params", "libraries")) and all(
            isinstance(last[k], str) for k in ("flow_run_id", "finished_at", "model_uri")
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        ok, why = False, f"{type(exc).__name__}: {str(exc)[:120]}"
    else:
        why = "fields of the wrong type"
    if not ok:
        logging.getLogger(__name__).warning(
            "%s is damaged (%s); retraining as if no run had succeeded", state_file, why
        )
    return last if ok else None


def _link(reg) -> None:
    """The MLflow run's address on the Prefect flow run (the MLflow run has the flow-run id tag)."""
    uri, page = reg.tracking_uri, f"#/experiments/{reg.experiment_id}/runs/{reg.run_id}"
    where = (
        f"[{uri}/{page}]({uri}/{page})"
        if uri.startswith("http")
        else (f"`mlflow ui --backend-store-uri {uri}`, then `{page}`")
    )
    create_markdown_artifact(
        markdown=f"# MLflow run\n\nRun `{reg.run_id}` ({reg.model_uri}): {where}\n",
        key="mlflow-run",
        description="the MLflow run of this flow run",
    )


def _record(cfg, stage: str, exc: Exception, tags: dict[str, str]) -> None:
    """Mark the failure in MLflow; a tracking store that is down must not hide the original error."""
    log = get_run_logger()
    error = _why(exc)
    try:
        run_id = _stage(record_failure)(cfg, stage, error, tags)
        log.error("stage %s failed; MLflow run %s marked FAILED", stage, run_id)
        where = f"MLflow run `{run_id}` is marked FAILED with this error and `failed_stage={stage}`."
    except Exception as tracking_error:
        log.warning("stage %s failed and MLflow could not record it: %s", stage, tracking_error)
        where = f"MLflow could not record it: {tracking_error}"
    create_markdown_artifact(
        markdown=f"# Failed at stage `{stage}`\n\n{error}\n\n{where}\n", key="failure", description="why"
    )


def _why(exc: Exception) -> str:
    return str(exc) if isinstance(exc, HeadstartError) else f"{type(exc).__name__}: {exc}"


def _failure_report(cfg, stage: str, exc: Exception) -> None:
    """The run report up to the failed stage, headed by why (after _record, so it joins the FAILED
    MLflow run); a report that cannot be written must not hide the original error."""
    log = get_run_logger()
    try:
        result = _stage(report)(cfg, failed=stage, error=_why(exc))
        log.error("stage %s failed; the run report up to it: %s", stage, result.path)
        _publish(cfg, "report", "run-report")
    except Exception as report_error:
        log.warning("stage %s failed and its run report could not be written: %s", stage, report_error)


def _publish(cfg, stage: str, key: str, failed: bool = False) -> None:
    """A stage's summary as a Prefect markdown artifact, so the UI tells the story; a stage whose
    gate refused its result left it in failed/."""
    summary = cfg.stage_dir(stage) / (f"{FAILED}/summary.md" if failed else "summary.md")
    if summary.exists():
        create_markdown_artifact(markdown=summary.read_text(), key=key, description=f"headstart {stage}")
