"""The Prefect flow `training`: which stages run, in what order; the stages themselves live in tasks/."""

from __future__ import annotations

import logging

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from headstart import HeadstartError
from headstart.config import load_params
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.prepare import prepare
from tasks.register import register
from tasks.train_head import train_head


class _NoTracebackForUserErrors(logging.Filter):
    """A HeadstartError (bad data, bad params, a failed gate) is logged as its message, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HeadstartError):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_NoTracebackForUserErrors())


def _stage(fn):
    # caching is DVC's and the feature cache's job; Prefect gives retries, logs, state and the UI
    return task(fn, name=fn.__name__, cache_policy=NO_CACHE)


@flow(name="training", log_prints=True)
def training(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """prepare -> [validate] -> [domain] -> train_head -> [finetune] -> evaluate -> export -> register."""
    log = get_run_logger()
    cfg = load_params(params_file, overrides)
    prepared = _stage(prepare)(cfg)
    log.info(
        "prepare: %d images (%d skipped), classes %s", prepared.n_images, prepared.n_skipped, prepared.classes
    )
    # validate (Great Expectations gate) and domain (pretraining-statistics check) slot in here
    trained = _stage(train_head)(cfg)
    # finetune, gated on dataset size, slots in here
    evaluated = _stage(evaluate)(cfg)
    exported = _stage(export)(cfg)
    registered = _stage(register)(cfg, tags={"prefect.flow_run_id": str(flow_run.id)})
    return {
        "prepare": prepared.__dict__,
        "train_head": trained.__dict__,
        "evaluate": evaluated.__dict__,
        "export": exported.__dict__,
        "register": registered.__dict__,
        "artifacts_dir": str(cfg.project.artifacts_dir),
    }
