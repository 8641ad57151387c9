"""Every report of a sandboxed test: what came back from the sandbox, plus what P must add.

Reports are built with ``item.ihook.pytest_runtest_makereport`` from a ``CallInfo``, so every
plugin's report hooks (pytest's xfail handling among them) see them as for a normal test. P adds
reports for the phases the test never reported (it crashed, exited, was killed), the cause of a
limit violation, and the sandbox's setup errors. The user-visible strings are constants; tests
import them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import pytest

from . import compat, probe
from .box.cgroups import Usage
from .box.config import SandboxResult
from .spec import DEFAULT_PIDS, SandboxSpec, format_size

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
NOT_CARRIED: Final = "nsbox: {nodeid}: state from the sandbox was not carried back: {problem}"
SKIP_HINT: Final = " Hint: {hint}"
REQUIRE_NOTE: Final = " (an error, not a skip, because of --nsbox-require)"
STACK_SECTION: Final = "nsbox: stack at timeout"
LIMIT_SECTION: Final = "nsbox: limit"
OUTSIDE_TEARDOWN_SECTION: Final = "nsbox: teardown outside the sandbox"
CAPTURED_SECTION: Final = "Captured {name} before the crash"
# Where the sandbox's machinery enters pytest's protocol: in a stack dump, every frame from here down is ours.
PROTOCOL_ENTRY_FRAMES: Final = ('/pytest_nsbox/compat.py"', '/pytest_nsbox/runtest.py"')


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


# --- reports P makes itself -----------------------------------------------------------------------


def failure_report(item: pytest.Item, when: str, message: str, sections: Iterable[tuple[str, str]] = ()) -> pytest.TestReport:
    """A failed *when* report (FAILED for call, ERROR for setup/teardown) with *message*."""
    compat.evaluate_xfail(item)

    def fail() -> None:
        pytest.fail(message, pytrace=False)

    call = pytest.CallInfo.from_call(fail, when=when)  # type: ignore[arg-type]
    report: pytest.TestReport = item.ihook.pytest_runtest_makereport(item=item, call=call)
    report.sections.extend(sections)
    return report


def skip_report(item: pytest.Item, message: str) -> pytest.TestReport:
    """A skipped setup report located at the test (like a skip marker)."""

    def skip() -> None:
        raise compat.skip_at_item(message)

    call = pytest.CallInfo.from_call(skip, when="setup")
    report: pytest.TestReport = item.ihook.pytest_runtest_makereport(item=item, call=call)
    return report


def passed_report(item: pytest.Item, when: str) -> pytest.TestReport:
    """An empty passed report for a phase that produced none (keeps junitxml and xdist whole)."""
    call = pytest.CallInfo.from_call(lambda: None, when=when)  # type: ignore[arg-type]
    report: pytest.TestReport = item.ihook.pytest_runtest_makereport(item=item, call=call)
    return report


def unavailable_report(item: pytest.Item, message: str, *, require: bool) -> pytest.TestReport:
    """The sandbox cannot be had here: SKIPPED, or an ERROR under --nsbox-require."""
    if require:
        return failure_report(item, "setup", message + REQUIRE_NOTE)
    return skip_report(item, message)


def setup_error_report(item: pytest.Item, record: dict[str, Any], *, require: bool) -> pytest.TestReport:
    """A step of building the sandbox failed: unavailable (with a diagnosed hint), or refused."""
    step = str(record.get("step"))
    if step == "verify_sandbox":
        return failure_report(item, "setup", NOT_INSIDE.format(message=record.get("message")))
    message = SETUP_FAILED.format(step=step, message=record.get("message"))
    hint = probe.hint_for(step, record.get("errno"))
    if hint:
        message += SKIP_HINT.format(hint=hint)
    if record.get("traceback"):
        message += "\n" + str(record["traceback"])
    return unavailable_report(item, message, require=require)


def merge_teardown(item: pytest.Item, in_sandbox: pytest.TestReport | None, outside: pytest.CallInfo[None]) -> pytest.TestReport:
    """The one teardown report: the sandbox's (function scope) merged with P's (wider scopes)."""
    if outside.excinfo is None:
        return in_sandbox if in_sandbox is not None else passed_report(item, "teardown")
    report: pytest.TestReport = item.ihook.pytest_runtest_makereport(item=item, call=outside)
    if in_sandbox is None or in_sandbox.passed:
        if in_sandbox is not None:
            report.sections[:0] = in_sandbox.sections
        return report
    in_sandbox.sections.append((OUTSIDE_TEARDOWN_SECTION, str(report.longrepr)))
    return in_sandbox


# --- limits ---------------------------------------------------------------------------------------


@dataclass
class Cause:
    """A limit the sandbox hit: the failure message and extra report sections."""

    message: str
    sections: list[tuple[str, str]] = field(default_factory=list)
    reported: bool = False


def limit_violation(spec: SandboxSpec, result: SandboxResult) -> Cause | None:
    """Why the test must fail because of its limits, from the kernel's own counters."""
    usage = result.usage
    if result.timed_out:
        stack = trim_stack(result.stack)
        sections = [(STACK_SECTION, stack)] if stack else []
        return Cause(TIMED_OUT.format(seconds=spec.timeout or 0.0), sections)
    if usage.oom_kills and spec.memory is not None:
        peak = format_size(usage.memory_peak) if usage.memory_peak is not None else "unknown"
        plural = "es" if usage.oom_kills != 1 else ""
        return Cause(MEMORY_EXCEEDED.format(limit=format_size(spec.memory), peak=peak, count=usage.oom_kills, plural=plural))
    if usage.pids_limit_hits:
        return Cause(PIDS_EXCEEDED.format(limit=spec.pids or DEFAULT_PIDS, count=usage.pids_limit_hits))
    return None


def trim_stack(dump: str) -> str:
    """faulthandler's dump without the frames of pytest-nsbox and pytest's main loop below the test."""
    kept, skipping = [], False
    for line in dump.splitlines():
        if line.startswith(("Thread ", "Current thread ")):
            skipping = False  # a new thread's stack
        elif any(entry in line for entry in PROTOCOL_ENTRY_FRAMES):
            skipping = True  # every frame below is the sandbox's own machinery
        if not skipping:
            kept.append(line)
    return "\n".join(kept).strip()


def with_cause(item: pytest.Item, report: pytest.TestReport, cause: Cause) -> pytest.TestReport:
    """Make the call report fail with *cause* (once); other reports pass through."""
    if cause.reported or report.when != "call":
        return report
    cause.reported = True
    if report.failed:
        report.sections.append((LIMIT_SECTION, cause.message))
        return report
    return failure_report(item, "call", cause.message, [*report.sections, *cause.sections])


def limit_properties(spec: SandboxSpec, usage: Usage) -> list[tuple[str, object]]:
    """user_properties for junit-xml and the memory summary."""
    properties: list[tuple[str, object]] = []
    if usage.memory_peak is not None:
        properties.append(("nsbox_memory_peak", usage.memory_peak))
    if spec.memory is not None:
        properties.append(("nsbox_memory_limit", spec.memory))
    return properties


# --- from the sandbox's records -------------------------------------------------------------------


@dataclass
class SandboxReports:
    """The reports of one sandboxed run, and what P must do after logging them.

    ``reports`` are the phase reports (setup, call, teardown), which the phase logic works off;
    ``others`` the other reports the test logged (subtests, other plugins' reports), each with
    the number of phase reports logged before it, so that P logs all in C's order.
    """

    reports: list[pytest.TestReport] = field(default_factory=list)
    others: list[tuple[int, pytest.TestReport]] = field(default_factory=list)
    pending: BaseException | None = None  # pytest.exit or KeyboardInterrupt raised in the sandbox
    warnings: list[dict[str, Any]] = field(default_factory=list)  # records to re-issue in P

    def teardown(self) -> pytest.TestReport | None:
        return next((r for r in self.reports if r.when == "teardown"), None)

    def in_order(self) -> list[pytest.TestReport]:
        """Every report in the order C logged them (P's added phases last)."""
        ordered: list[pytest.TestReport] = []
        others = iter(self.others)
        following = next(others, None)
        for index, report in enumerate(self.reports):
            while following is not None and following[0] <= index:
                ordered.append(following[1])
                following = next(others, None)
            ordered.append(report)
        if following is not None:
            ordered.append(following[1])
        ordered.extend(report for _, report in others)
        return ordered


def from_sandbox(item: pytest.Item, spec: SandboxSpec, result: SandboxResult, *, require: bool) -> SandboxReports:
    """Turn the records of *result* into reports; add the phases never reported and the cause
    of a limit violation."""
    config = item.config
    out = SandboxReports()
    for record in result.records:
        kind = record["kind"]
        if kind == "report":
            try:
                report = compat.report_from_serializable(config, record["data"])
            except Exception as exc:  # noqa: BLE001 - the stream comes from untrusted code
                report = failure_report(item, "call", UNUSABLE_REPORT.format(detail=exc))
            if record.get("phase", True):
                out.reports.append(report)
            else:
                out.others.append((len(out.reports), report))
        elif kind == "warning":
            out.warnings.append(record)
        elif kind == "exit":
            out.pending = pytest.exit.Exception(str(record.get("msg", "")), returncode=record.get("returncode"))
        elif kind == "interrupt":
            out.pending = KeyboardInterrupt()
        elif kind == "setup_error":
            out.reports = [setup_error_report(item, record, require=require)]  # no test ran: nothing else to report
            out.others = []
            out.pending = None
            break
        elif kind == "internal_error":
            text = INTERNAL_ERROR.format(process=record.get("process"), traceback=record.get("traceback"))
            out.reports.append(failure_report(item, "call", text))
    if result.setup_error is None:
        cause = limit_violation(spec, result)
        if cause is None and result.wire_error:
            cause = Cause(CORRUPT_STREAM.format(detail=result.wire_error))
        if out.pending is None:
            out.reports.extend(missing_phases(item, out.reports, result.test_status, cause))
        if cause is not None:
            out.reports = [with_cause(item, r, cause) for r in out.reports]
    properties = limit_properties(spec, result.usage)
    for report in out.reports:
        report.user_properties.extend(properties)
    return out


def missing_phases(
    item: pytest.Item, got: list[pytest.TestReport], status: int | None, cause: Cause | None
) -> list[pytest.TestReport]:
    """Reports for phases the test never reported: it crashed, exited or was killed before."""
    phases = {r.when: r for r in got}
    complete = status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    if complete and "teardown" in phases and cause is None:
        return []
    setup = phases.get("setup")
    if setup is None:
        missing = "setup"
    elif setup.passed and "call" not in phases and not item.config.getoption("setuponly", False):
        missing = "call"
    elif "teardown" not in phases:
        missing = "teardown"
    else:
        return []
    captured = _captured_sections(item.config)
    if cause is not None:
        message, sections = cause.message, [*captured, *cause.sections]
        cause.reported = True
    else:
        message, sections = early_end_message(status, missing), captured
    out = [failure_report(item, missing, message, sections)]
    if missing != "teardown":
        out.append(passed_report(item, "teardown"))
    return out


def _captured_sections(config: pytest.Config) -> list[tuple[str, str]]:
    """What the test wrote to the (shared) capture files before it died."""
    captured = compat.captured_so_far(config)
    if captured is None:
        return []
    return [(CAPTURED_SECTION.format(name=name), text) for name, text in zip(("stdout", "stderr"), captured, strict=True) if text]
