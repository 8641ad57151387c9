"""Turn what came back from a sandbox into pytest reports: crashes, early exits, setup errors.

Reports are built with ``item.ihook.pytest_runtest_makereport`` from a ``CallInfo``, so every
plugin's report hooks (pytest's xfail handling among them) see them as for a normal test.
The user-visible strings are constants; tests import them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from typing import Final

import pytest

# Public wording (DESIGN.md "Outcomes"): keep the listed words stable.
CRASHED: Final = "nsbox: the test process crashed with signal {signame} ({description}) during {phase}"
EXITED_EARLY: Final = "nsbox: the test process exited with status {code} during {phase}, before reporting its result"
SANDBOX_DIED: Final = "nsbox: the sandbox's init process ended without reporting the test's status ({detail})"
BUILDER_LOST: Final = "nsbox: {detail}; sandboxes are built when each test starts from now on (slower)"
SETUP_FAILED: Final = "nsbox: could not build the sandbox: step {step} failed: {message}"
NOT_INSIDE: Final = "nsbox: refusing to run the test: {message}"
MEMORY_EXCEEDED: Final = "nsbox: test exceeded its memory limit of {limit} (peak {peak}, {count} process{plural} OOM-killed)"
PIDS_EXCEEDED: Final = "nsbox: pids limit {limit} reached ({count} fork(s) refused)"
TIMED_OUT: Final = "nsbox: test timed out after {seconds:.1f}s; every process of the sandbox was killed"
INTERNAL_ERROR: Final = "nsbox: internal error in the sandbox ({process}):\n{traceback}"
CORRUPT_STREAM: Final = "nsbox: the result stream from the sandbox was corrupt ({detail})"
UNUSABLE_REPORT: Final = "nsbox: a report from the sandbox could not be read ({detail})"
SKIP_HINT: Final = " Hint: {hint}"
REQUIRE_NOTE: Final = " (an error, not a skip, because of --nsbox-require)"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def early_end_message(status: int | None, phase: str) -> str:
    """Why the test ended without reporting *phase*."""
    if status is None:
        return SANDBOX_DIED.format(detail="no status received")
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return CRASHED.format(signame=signal_name(signum), description=signal.strsignal(signum) or "unknown signal", phase=phase)
    return EXITED_EARLY.format(code=os.waitstatus_to_exitcode(status), phase=phase)


def _evaluate_xfail(item: pytest.Item) -> None:
    """Give pytest's xfail logic in P what it computed in C (a crash of an xfail test is XFAIL)."""
    try:
        from _pytest.skipping import evaluate_xfail_marks, xfailed_key
    except ImportError:  # pragma: no cover - private API moved
        return
    if item.stash.get(xfailed_key, None) is None:
        try:
            item.stash[xfailed_key] = evaluate_xfail_marks(item)
        except Exception:  # noqa: BLE001 - a broken condition was reported in C already
            pass


def failure_report(item: pytest.Item, when: str, message: str, sections: Iterable[tuple[str, str]] = ()) -> pytest.TestReport:
    """A failed *when* report (FAILED for call, ERROR for setup/teardown) with *message*."""
    _evaluate_xfail(item)

    def fail() -> None:
        pytest.fail(message, pytrace=False)

    call = pytest.CallInfo.from_call(fail, when=when)  # type: ignore[arg-type]
    report: pytest.TestReport = item.ihook.pytest_runtest_makereport(item=item, call=call)
    report.sections.extend(sections)
    return report


def skip_report(item: pytest.Item, message: str) -> pytest.TestReport:
    """A skipped setup report located at the test (like a skip marker)."""

    def skip() -> None:
        raise pytest.skip.Exception(message, _use_item_location=True)

    call = pytest.CallInfo.from_call(skip, when="setup")
    report: pytest.TestReport = item.ihook.pytest_runtest_makereport(item=item, call=call)
    return report


def passed_report(item: pytest.Item, when: str) -> pytest.TestReport:
    """An empty passed report for a phase that produced none (keeps junitxml and xdist whole)."""
    call = pytest.CallInfo.from_call(lambda: None, when=when)  # type: ignore[arg-type]
    report: pytest.TestReport = item.ihook.pytest_runtest_makereport(item=item, call=call)
    return report
