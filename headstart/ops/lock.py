"""One writer at a time per project (a flow run, `headstart stage`, so `dvc repro`, and the commands
that write artifacts): an exclusive lock file in the cache folder."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from headstart import HeadstartError


class Busy(HeadstartError):
    """Another run holds the project's lock."""


@contextmanager
def exclusive(path: str | Path, wait_s: float = 0.0) -> Iterator[None]:
    """Hold an flock on `path` for the block; wait up to `wait_s` for another holder, then refuse
    with its pid. The OS releases the lock when a holder dies, so a killed run never blocks the next."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    raise Busy(
                        f"another headstart run or stage (pid {holder}) is writing this project's "
                        f"artifacts ({path}); waited {wait_s:.0f} s; try again when it ends or raise "
                        f"schedule.lock_wait_s"
                    ) from None
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
