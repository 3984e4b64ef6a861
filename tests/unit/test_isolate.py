"""headstart.ops.isolate: a function run in a fresh process, its result and exceptions brought back.

The targets below run in the child, imported there by name ("tests.unit.test_isolate:...")."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from headstart import HeadstartError
from headstart.ops.isolate import ChildTraceback, call, isolated
from headstart.validation import ValidationFailed

HERE = "tests.unit.test_isolate"


def report_pid(cfg, word: str = "") -> dict:
    print(f"quarantined {word}")
    print("no newline at the end", end="")
    sys.stderr.write("a warning\n")
    return {"pid": os.getpid(), "cfg": cfg, "word": word, "ppid": os.getppid()}


def refuse(cfg) -> None:
    raise ValidationFailed(f"validation failed: enough_classes (1 of {cfg} classes)")


def die(cfg) -> None:
    print("about to be killed")
    os.kill(os.getpid(), signal.SIGKILL)


def park(pidfile) -> None:
    pidfile.write_text(str(os.getpid()))
    time.sleep(600)


def test_the_function_runs_in_another_process_and_its_result_and_prints_come_back(capsys):
    stage = isolated(f"{HERE}:report_pid", "stage report_pid")
    assert stage.__name__ == "report_pid"  # Prefect names the task after it
    result = stage({"a": 1}, word="cat_001.png")
    assert result["pid"] != os.getpid() and result["ppid"] == os.getpid()
    assert result["cfg"] == {"a": 1} and result["word"] == "cat_001.png"
    out, err = capsys.readouterr()
    assert out == "quarantined cat_001.png\nno newline at the end\n" and err == "a warning\n"


def test_a_gate_failure_in_the_child_reaches_the_caller_as_itself():
    with pytest.raises(ValidationFailed) as raised:
        call(f"{HERE}:refuse", "stage refuse", 3)
    assert str(raised.value) == "validation failed: enough_classes (1 of 3 classes)"
    cause = raised.value.__cause__
    assert isinstance(cause, ChildTraceback) and "in refuse" in str(cause)  # the child's traceback


def test_a_child_killed_mid_stage_is_one_line_naming_the_stage_and_the_signal(capsys):
    with pytest.raises(HeadstartError) as raised:
        call(f"{HERE}:die", "stage die", None)
    message = str(raised.value)
    assert message.startswith("stage die: its process (pid ") and "killed by SIGKILL" in message
    assert "\n" not in message and type(raised.value) is HeadstartError
    assert capsys.readouterr().out == "about to be killed\n"  # what it said before it died


def test_a_caller_that_stops_waiting_kills_the_child(tmp_path):
    """Prefect's timeout raises in the waiting caller (SIGALRM in the main thread, as Prefect's does),
    here sent once the child is parked in the function: the child must not run on."""
    pidfile = tmp_path / "pid"

    def timeout(*_):
        raise TimeoutError("the task's timeout")

    def alarm_once_parked():
        deadline = time.monotonic() + 120
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGALRM)

    previous = signal.signal(signal.SIGALRM, timeout)
    try:
        threading.Thread(target=alarm_once_parked, daemon=True).start()
        with pytest.raises(TimeoutError):
            call(f"{HERE}:park", "stage park", pidfile)
    finally:
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)  # killed and reaped


def test_a_prewarmed_child_runs_the_call_and_a_stale_or_unused_one_is_let_go(monkeypatch):
    """prewarm starts the child ahead (its imports beside the caller's work); the call then runs in
    it. A spare started under another environment is stopped and a fresh child runs the call; a
    spare whose caller closes its end exits on its own."""
    import headstart.ops.isolate as iso

    target = f"{HERE}:report_pid"
    iso.prewarm(target, "json")
    spare = iso._spares[target][1]
    assert call(target, "stage warm", "cfg")["pid"] == spare.pid and target not in iso._spares
    iso.prewarm(target)
    stale = iso._spares[target][1]
    monkeypatch.setenv("HEADSTART_TEST_SOMETHING_ELSE", "1")
    assert call(target, "stage warm", "cfg")["pid"] != stale.pid
    assert stale.poll() is not None  # stopped, not left waiting
    iso.prewarm(target, "no_such_module_anywhere")  # a failed import is the job's to report
    conn, unused, _, _ = iso._spares.pop(target)
    conn.close()
    assert unused.wait(timeout=30) == 0


def test_a_spare_that_died_waiting_hands_the_job_to_a_fresh_child():
    import headstart.ops.isolate as iso

    target = f"{HERE}:report_pid"
    iso.prewarm(target)
    spare = iso._spares[target][1]
    os.kill(spare.pid, signal.SIGKILL)
    spare.wait(timeout=30)
    assert call(target, "stage warm", "cfg")["pid"] not in (spare.pid, os.getpid())
