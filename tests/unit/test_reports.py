"""Wording of crash and early-exit outcomes."""

from __future__ import annotations

import os
import signal

from pytest_nsbox import reports


def _signaled(signum: int) -> int:
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signum)
        os._exit(0)
    return os.waitpid(pid, 0)[1]


def _exited(code: int) -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(code)
    return os.waitpid(pid, 0)[1]


def test_crash_message_names_the_signal() -> None:
    text = reports.early_end_message(_signaled(signal.SIGKILL), "call")
    assert text == "nsbox: the test process crashed with signal SIGKILL (Killed) during call"


def test_early_exit_message_names_the_status_and_phase() -> None:
    assert reports.early_end_message(_exited(3), "setup") == (
        "nsbox: the test process exited with status 3 during setup, before reporting its result"
    )


def test_missing_status() -> None:
    assert "without reporting the test's status" in reports.early_end_message(None, "call")


def test_signal_name_of_unknown_signal() -> None:
    assert reports.signal_name(200) == "signal 200"
