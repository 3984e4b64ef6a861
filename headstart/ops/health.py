"""Waiting for a started server to answer: shared by the servers headstart starts."""

from __future__ import annotations

import time
import urllib.request

from headstart import HeadstartError


def wait_healthy(url: str, alive, wait_s: float, what: str, hint: str = "") -> None:
    """Poll `url` until it answers 200; fail at once when `alive()` says the process exited."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not alive():
            raise HeadstartError(f"{what} exited at start{hint}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise HeadstartError(f"{what} did not answer {url} within {wait_s:.0f} s{hint}")
