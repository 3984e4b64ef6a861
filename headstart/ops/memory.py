"""Memory between the stages of one process (the Prefect flow runs them all in one): what a stage
freed goes back to the operating system before the next one starts, and buffers freed inside a
stage go back at once.

glibc serves a request of 128 KiB or more with its own mmap, unmapped when freed, but raises that
threshold to the size of each such block freed, up to 32 MiB: after the first big free, every
buffer of up to 32 MiB (decoded images, onnx graphs and their serialised bytes, onnxruntime's
activations) comes from the heap instead, where what is freed stays resident behind whatever is
still in use above it. On the demo flow that held ~0.2 GB more at export's peak (1,544 vs 1,321
MB). `return_freed_buffers` fixes the threshold at 128 KiB for the pipeline's processes;
`reused_buffers` lifts it around the loops that allocate and free the same mid-size buffers
thousands of times (head training, parity's batch-1 runs), where an mmap per buffer cost up to 22 s
on the demo."""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
SMALL = 128 * 1024  # glibc's initial threshold: a freed buffer of this size or more is unmapped
LARGE = 32 * 1024 * 1024  # glibc's ceiling for the raised threshold (64-bit)
_fixed = False  # return_freed_buffers has run in this process
_depth = 0  # reused_buffers blocks open in this process (the outermost one lowers the threshold)


def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _threshold(size: int) -> bool:
    """Buffers of `size` or more are mmapped; free memory at the heap's top is given back past twice
    that (what glibc's own raised threshold does: a loop's buffers are not given back and faulted in
    again on every pass)."""
    libc = _libc()
    if libc is None:
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, size) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2 * size) == 1


def return_freed_buffers() -> bool:
    """Keep glibc's mmap threshold at 128 KiB for the rest of this process (module doc). False where
    libc is not glibc (nothing changes)."""
    global _fixed
    _fixed = _fixed or _threshold(SMALL)
    return _fixed


@contextmanager
def reused_buffers() -> Iterator[None]:
    """Buffers of up to 32 MiB come from the heap inside the block, where a loop reuses them; on the
    way out the threshold is back at 128 KiB and what the block freed goes back (malloc_trim). Only
    where return_freed_buffers fixed it: elsewhere glibc's own policy is left alone. A block inside
    another keeps the lift until the outermost one ends."""
    global _depth
    lifted = _fixed and (_depth > 0 or _threshold(LARGE))
    _depth += lifted
    try:
        yield
    finally:
        _depth -= lifted
        if lifted and _depth == 0:
            _threshold(SMALL)
            trim_heap()


def trim_heap() -> bool:
    """Give glibc's free pages back (malloc_trim), wherever they lie in its heaps. False where libc
    has no malloc_trim (not glibc)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def release_memory() -> bool:
    """Collect cycles (the domain probe's hooks hold its modules in one), then give glibc's free pages
    back (malloc_trim): its arenas keep what the decode threads and onnxruntime freed, and a later
    stage would otherwise start that much higher (demo: up to 0.3 GB). What survives the collection
    (modules, classes, the flow's own state) is frozen out of later ones: each full collection of
    the millions of objects torch, MLflow and Prefect load took ~0.2 s, 3.3 s over a flow. False
    where libc has no malloc_trim (not glibc)."""
    gc.collect()
    gc.freeze()
    return trim_heap()
