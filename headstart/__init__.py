"""headstart: a folder of a few labelled images -> a tracked, exported transfer-learning classifier."""

import os

__version__ = "0.1.0"

# Telemetry off everywhere, before any of these libraries is imported; the user's own setting wins.
for _key, _value in {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_key, _value)


class HeadstartError(Exception):
    """An error the user can fix (bad data, bad params); the CLI prints it on one line, no traceback."""


class GateFailed(HeadstartError):
    """A stage refused its own result (validation, domain, export parity): its report goes to
    artifacts/<stage>/failed/ and the last good outputs stay as they were."""


class TransientError(HeadstartError):
    """A failure that may pass on its own (a tracking server down): the flow retries it."""
