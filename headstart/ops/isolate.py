"""A function run in a fresh Python process: what it imports (a heavy library used by one stage) leaves
with that process instead of staying in the caller's for the rest of a long run.

The child is a new interpreter (`python -c`), not a fork, and imports the function by name
("module:function"): none of the caller's state reaches it but its arguments and sys.path. Its result
comes back pickled; an exception comes back as itself (its class, so a GateFailed stays a GateFailed),
with the child's traceback as its cause; its prints come back to the caller's print (so Prefect's
log_prints logs them) and stderr. A child that dies before it answers is one HeadstartError line.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing import Pipe
from multiprocessing.connection import Connection

from headstart import HeadstartError

EXIT_GRACE_S = 60  # a child that answered may still flush and run atexit; then it is killed


def isolated(target: str, label: str) -> Callable:
    """A function that calls `target` ("module:function") in a fresh process on every call; it takes
    the stage contract's (cfg, **kwargs) and is named as the target (Prefect names its task so)."""

    def run(cfg, **kwargs):
        return call(target, label, cfg, **kwargs)

    run.__name__ = run.__qualname__ = target.rpartition(":")[2]
    run.__doc__ = f"{target}, in its own process (headstart.ops.isolate)"
    return run


# target -> a child that imported its modules, and the environment and folder it started in
_spares: dict[str, tuple[Connection, subprocess.Popen, dict, str]] = {}


def prewarm(target: str, *modules: str) -> None:
    """Start the child of a later call(target) now: it imports `modules` (a stage's heavy library,
    e.g. Great Expectations' ~3 s) while the caller does other work, then waits for its job. One
    spare per target; a spare never used exits when this process closes its end."""
    if target not in _spares:
        _spares[target] = (*_spawn(modules), dict(os.environ), os.getcwd())


def _spare(target: str) -> tuple[Connection, subprocess.Popen] | None:
    """The spare for `target` if it is alive and started where this call would start one (the same
    environment and folder: a child inherits both), else None (a stale one is stopped)."""
    conn, child, env, cwd = _spares.pop(target, (None, None, None, None))
    if child is None:
        return None
    if child.poll() is None and env == dict(os.environ) and cwd == os.getcwd():
        return conn, child
    conn.close()
    _reap(child, 5)
    return None


def _spawn(modules: tuple[str, ...] = ()) -> tuple[Connection, subprocess.Popen]:
    ours, theirs = Pipe()
    code = f"from headstart.ops.isolate import serve; serve({theirs.fileno()}, {list(modules)!r})"
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    return ours, child


def call(target: str, label: str, *args, spare: str | None = None, **kwargs):
    """target(*args, **kwargs) in a fresh Python process (the spare prewarm started for `spare`,
    default `target`, if any); `label` names it in the error a dead child gives. The child is killed
    when the caller stops waiting (a timeout, Ctrl-C)."""
    ours, child = _handed(_spare(spare or target), target, args, kwargs) or _handed(
        _spawn(), target, args, kwargs, label
    )
    answered = False
    try:
        kind, value = _relay(ours, child, label)
        answered = True
    finally:
        ours.close()
        _reap(child, EXIT_GRACE_S if answered else 0)
    if kind == "error":
        exc, text = value
        raise exc from (ChildTraceback(text) if text else None)
    return value


def _handed(pair, target: str, args, kwargs, label: str | None = None):
    """`pair` (its connection, the child) once the child has the job; None when there was no pair or
    a spare died before it took the job (a fresh child then runs it); a fresh child that dies before
    taking it (`label` given) is the one-line error of a dead child."""
    if pair is None:
        return None
    conn, child = pair
    try:
        conn.send(sys.path)  # first, so the job's arguments unpickle where the caller's did
        conn.send((target, args, kwargs))
        return conn, child
    except OSError:  # the child is gone: a broken pipe, a reset connection
        conn.close()
        if label is not None:
            raise _died(label, child) from None
        _reap(child, 5)
        return None


class ChildTraceback(Exception):
    """The child's traceback, as the cause of the exception it raised."""


def _relay(conn: Connection, child: subprocess.Popen, label: str) -> tuple[str, object]:
    """Forward the child's output until its answer: ("result", value) or ("error", (exc, traceback))."""
    while True:
        while not conn.poll(0.5):  # waits in slices: Prefect's timeout can interrupt between them
            if child.poll() is not None and not conn.poll():  # dead (a grandchild may hold its socket)
                raise _died(label, child)
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):  # closed, or reset by a child killed with data unread
            raise _died(label, child) from None
        if kind == "stdout":
            print(value)  # the caller's print: under Prefect's log_prints, a log line of the task
        elif kind == "stderr":
            sys.stderr.write(value)
            sys.stderr.flush()
        else:
            return kind, value


def _died(label: str, child: subprocess.Popen) -> HeadstartError:
    code = child.wait()
    if code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
        if -code == signal.SIGKILL:
            how += " (as the out-of-memory killer does)"
    else:
        how = f"exited with status {code}"
    return HeadstartError(
        f"{label}: its process (pid {child.pid}) {how} before it finished; "
        "its last good outputs stay as they were"
    )


def _reap(child: subprocess.Popen, grace_s: float) -> None:
    try:
        child.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def serve(fd: int, modules: list[str] | tuple[str, ...] = ()) -> None:
    """The child's side: import `modules` (a prewarmed spare's), read sys.path and the job from `fd`,
    run it, answer, exit; a spare whose caller went away (end of file) just exits."""
    conn = Connection(fd)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # the job's own import will say what is wrong, where it can be reported
            break
    try:
        sys.path[:] = conn.recv()
    except (EOFError, OSError):
        return
    streams = sys.stdout, sys.stderr
    lock = threading.Lock()
    out, err = _Forward(conn, "stdout", lock), _Forward(conn, "stderr", lock)
    sys.stdout, sys.stderr = out, err
    try:
        target, args, kwargs = conn.recv()
        module, _, name = target.rpartition(":")
        answer = ("result", getattr(importlib.import_module(module), name)(*args, **kwargs))
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the caller decides
        answer = ("error", (exc, traceback.format_exc()))
    out.end()
    sys.stdout, sys.stderr = streams  # what runs at exit writes to the inherited streams
    with lock:
        conn.send(_picklable(answer))
        conn.close()


def _picklable(answer: tuple[str, object]) -> tuple[str, object]:
    """The answer, or an error saying why it cannot travel (a result or exception pickle refuses)."""
    try:
        pickle.loads(pickle.dumps(answer))
        return answer
    except Exception as exc:
        kind, value = answer
        what = f"{type(value[0]).__name__}: {value[0]}" if kind == "error" else type(value).__name__
        text = value[1] if kind == "error" else ""
        return "error", (RuntimeError(f"the child's {kind} ({what}) cannot be sent back: {exc}"), text)


class _Forward(io.TextIOBase):
    """sys.stdout or sys.stderr of the child, sent to the caller: stdout whole lines (each a print
    there), stderr as written (progress bars redraw with \\r)."""

    def __init__(self, conn: Connection, kind: str, lock: threading.Lock):
        self._conn, self._kind, self._lock, self._buffer = conn, kind, lock, ""  # lock: one message at a time
        self._inherited = getattr(sys, kind)  # for writes after the answer (a handler kept this stream)

    def write(self, text: str) -> int:
        if self._kind == "stderr":
            self._send(text)
            return len(text)
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._send(line)
        return len(text)

    def end(self) -> None:
        """Send a last line that has no newline."""
        if self._buffer:
            self._send(self._buffer)
            self._buffer = ""

    def _send(self, text: str) -> None:
        with self._lock:
            if self._conn.closed:
                self._inherited.write(text + ("\n" if self._kind == "stdout" else ""))
            elif text or self._kind == "stdout":
                self._conn.send((self._kind, text))

    def fileno(self) -> int:  # faulthandler and the like write to the inherited descriptor
        return self._inherited.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return "utf-8"
