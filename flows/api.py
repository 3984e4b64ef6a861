"""The Prefect API a run talks to: the configured one, else the temporary server of headstart.ops.ephemeral
(bound to this process's life), with Prefect's queued logs and events sent before it stops."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def prefect_api(meanwhile: Callable[[], object] | None = None) -> Iterator[None]:
    """The configured Prefect API, else a temporary server that dies with this process (Prefect's
    own ephemeral server outlives a killed run). `meanwhile` runs while that server starts (its
    6-10 s on 2 cores overlap the caller's own imports and checks)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        if meanwhile is not None:
            meanwhile()
        yield
        return
    from headstart.ops.ephemeral import server

    with server(meanwhile=meanwhile) as url, temporary_settings(updates={PREFECT_API_URL: url}):
        try:
            yield
        finally:
            _drain()


def _drain() -> None:
    """Send the logs and events Prefect still queues before its server stops (as Prefect's own test
    harness does), or each one left prints 'Error logging to API' after the summary."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except Exception:  # a worker never started, or the server already gone: nothing to send
            pass
