"""Memory between the stages of one process (the Prefect flow runs them all in one): what a stage
freed goes back to the operating system before the next one starts."""

from __future__ import annotations

import ctypes
import gc


def release_memory() -> bool:
    """Collect cycles (the domain probe's hooks hold its modules in one), then give glibc's free pages
    back (malloc_trim): its arenas keep what the decode threads and onnxruntime freed, and a later
    stage would otherwise start that much higher (demo: up to 0.3 GB). False where libc has no
    malloc_trim (not glibc)."""
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True
