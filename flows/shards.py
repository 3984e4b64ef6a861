"""The shard map of sharded extraction (engine.runner process | dask) on Prefect's task runners: a
Prefect task `extract-shard` (headstart.shards.extract_shard) mapped over the shards on a process pool
(Prefect's ProcessPoolTaskRunner) or a Dask cluster (prefect-dask's DaskTaskRunner). Prefect is
imported only when a run is sharded; `local` never touches it. The task runner is used directly, not
through a flow of its own: the same code runs inside `headstart run` (the shards are task runs of that
flow run) and under `dvc repro` (`headstart stage`, no flow: against the configured Prefect API, else a
temporary server for this process). Importing this module makes `run` every Features' shard map
(headstart.shards.use_shard_map): the library itself never imports Prefect.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from headstart import HeadstartError
from headstart.config import EngineParams
from headstart.shards import Job, extract_shard, use_shard_map


def run(job: Job, shards: list[list[tuple]], p: EngineParams) -> list[dict]:
    """Map the shard task over `shards` on engine.runner; each shard's result, in order. A worker
    that dies mid-shard breaks a process pool (Dask reschedules the shard by itself): the shards
    left unfinished run again on a fresh pool, engine.retries times at most."""
    results: dict[int, dict] = {}
    pending = list(range(len(shards)))
    for _ in range(p.retries + 1):
        with _runner(p) as runner:
            futures = runner.map(_task(p), {"job": _unmapped(job), "items": [shards[i] for i in pending]})
            failed = []
            for i, future in zip(pending, futures, strict=True):
                try:
                    results[i] = future.result()
                except HeadstartError:
                    raise
                except Exception as exc:  # the worker died (BrokenProcessPool) or a retried error
                    failed.append(i)
                    error = exc
        pending = failed
        if not pending:
            return [results[i] for i in range(len(shards))]
    raise HeadstartError(
        f"engine.runner {p.runner}: {len(pending)} shard(s) failed after {p.retries} retries "
        f"(engine.retries); last error: {type(error).__name__}: {str(error)[:200]}"
    )


def _unmapped(value):
    from prefect.utilities.annotations import unmapped

    return unmapped(value)


def _task(p: EngineParams):
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    # bad data or params are not transient: a HeadstartError (an undecodable image) is never retried
    return task(
        extract_shard,
        name="extract-shard",
        retries=p.retries,
        retry_condition_fn=lambda _task, _run, state: not _is_user_error(state),
        cache_policy=NO_CACHE,
        persist_result=False,
    )


def _is_user_error(state) -> bool:
    try:
        state.result(raise_on_failure=True)
    except HeadstartError:
        return True
    except Exception:
        return False
    return False


@contextmanager
def _runner(p: EngineParams) -> Iterator:
    """The started task runner of engine.runner, against a Prefect API (the flow's, the configured
    one, else a temporary server that lives as long as this extraction)."""
    with _prefect_api():
        runner = _make_runner(p)
        try:
            runner.__enter__()
            if p.runner == "dask":
                runner.client  # noqa: B018 connect now: an address that does not answer fails here
        except (OSError, TimeoutError) as exc:
            runner.__exit__(None, None, None)
            raise HeadstartError(
                f"engine.dask_address {p.dask_address}: no Dask scheduler answered within "
                f"{p.connect_timeout_s:g} s ({type(exc).__name__}); start it (`dask scheduler`), correct "
                "the address, or leave engine.dask_address empty for a LocalCluster on this machine"
            ) from None
        try:
            yield runner
        finally:
            runner.__exit__(None, None, None)


def _make_runner(p: EngineParams):
    if p.runner == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=p.workers)
    from prefect_dask import DaskTaskRunner

    client = {"timeout": p.connect_timeout_s}
    if p.dask_address:
        return DaskTaskRunner(address=p.dask_address, client_kwargs=client)
    cluster = {"n_workers": p.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    return DaskTaskRunner(cluster_kwargs=cluster, client_kwargs=client)


@contextmanager
def _prefect_api() -> Iterator[None]:
    """Inside a flow run (or with PREFECT_API_URL set) its API; under `headstart stage` the temporary
    server that `headstart run` starts (flows.api.prefect_api: one mechanism), for this extraction."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

    from flows.api import prefect_api

    if FlowRunContext.get() or TaskRunContext.get():
        with _exported():
            yield
        return
    # the shard task runs are the whole record outside a flow: no flow run to attach logs to
    with (
        prefect_api(),
        temporary_settings(updates={PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}),
        _exported(),
    ):
        yield


@contextmanager
def _exported() -> Iterator[None]:
    """The context's settings (its API) made global while the runner lives: the process pool's event
    and log forwarding thread starts without the context, reads Prefect's global settings, and with
    no API there would start Prefect's own ephemeral server (which outlives a killed run)."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    saved = dict(os.environ)
    os.environ.update(get_current_settings().to_environment_variables(exclude_unset=True))
    refresh_global_settings_context()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        refresh_global_settings_context()


use_shard_map(run)
