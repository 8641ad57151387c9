"""Every report of a sandboxed test: what came back from the sandbox, plus what P must add.

Reports are built with ``item.ihook.pytest_runtest_makereport`` from a ``CallInfo``, so every
plugin's report hooks (pytest's xfail handling among them) see them as for a normal test. P adds
reports for the phases the test never reported (it crashed, exited, was killed), the cause of a
limit violation, and the sandbox's setup errors. A report P makes for a phase the test ran in
lasts from the end of the last phase the test reported to the end of the test, as P timed it:
durations (``--durations``, junit's ``time``) are the time the test really ran. The cause of an
outcome P decides comes first in the report's message (the short summary line, junit's failure
message) and is named in the junit property ``nsbox_cause``. The user-visible strings are
constants; tests import them.
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
from .box.steps import LEFTOVERS
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
DISK_FULL: Final = (
    "nsbox: disk limit of {limit} reached: what the test wrote (its writable layer, /tmp, /var/tmp, /run, /dev/shm) "
    "filled it{detail}"
)
DISK_KILLED: Final = " (scratch='disk': {used} found in it; the sandbox was killed)"
DISK_USAGE: Final = "disk_usage"  # record kind: C's look at the scratch tmpfs when the test ended
DISK_FULL_MARGIN: Final = 64 * 2**10  # less free than this when the test ended: the bound was reached
EXPECTED_HIT: Final = "{message}, as the marker expects (expect_limits)"
TEST_PROCESS_OOM_KILLED: Final = "{message}: the test process itself was killed (expect_limits covers the processes it starts)"
MEMORY_TOO_SMALL: Final = (
    "nsbox: memory limit of {limit} is too small for a sandbox to start here: {measured}; "
    "use memory={smallest!r} or more (plus what the test itself needs)"
)
PIDS_TOO_SMALL: Final = (
    "nsbox: pids limit {limit} is too small for a sandbox to start: it needs {smallest} processes before the test "
    "runs (the sandbox's unsharer, its init and the test process); use pids={smallest} or more "
    "(plus what the test itself starts)"
)
TIMED_OUT: Final = "nsbox: test timed out after {seconds:.1f}s; every process of the sandbox was killed"
INTERNAL_ERROR: Final = "nsbox: internal error in the sandbox ({process}):\n{traceback}"
CORRUPT_STREAM: Final = "nsbox: the result stream from the sandbox was corrupt ({detail})"
UNUSABLE_REPORT: Final = "nsbox: a report from the sandbox could not be read ({detail})"
NOT_CARRIED: Final = "nsbox: {nodeid}: state from the sandbox was not carried back: {problem}"
SKIP_HINT: Final = " Hint: {hint}"
REQUIRE_NOTE: Final = " (an error, not a skip, because of --nsbox-require)"
STACK_SECTION: Final = "nsbox: stack at timeout"
CRASH_STACK_SECTION: Final = "nsbox: stack at crash"
LIMIT_SECTION: Final = "nsbox: limit"
INTERNAL_SECTION: Final = "nsbox: internal error"
OUTSIDE_TEARDOWN_SECTION: Final = "nsbox: teardown outside the sandbox"
CAPTURED_SECTION: Final = "Captured {name} before the crash"
# junit-xml properties (user_properties): the limits the test asked for, and why P failed it.
LIMIT_PROPERTIES: Final = {
    "memory": "nsbox_memory_limit",  # bytes
    "pids": "nsbox_pids_limit",
    "cpus": "nsbox_cpus_limit",
    "timeout": "nsbox_timeout_limit",  # seconds
    "disk": "nsbox_disk_limit",  # bytes
}
LEFT_RUNNING: Final = "nsbox: the test left {count} process(es) running, killed when it ended ({first})"
LEAKS_SECTION: Final = "nsbox: processes left running"
LEAKS_WARN: Final = "warn"  # --nsbox-leaks: a warning and a report section
LEAKS_FAIL: Final = "fail"  # --nsbox-leaks: the test fails
LEAKS_WARNING: Final = "pytest_nsbox.runtest:NsboxWarning"  # the category of the warning, as replay_warning finds it
CAUSE_PROPERTY: Final = "nsbox_cause"  # memory, pids, disk, timeout, signal:SIGSEGV, exit, stream, internal, leaks
EXPECTED_PROPERTY: Final = "nsbox_expected_limit"  # memory, pids, disk: a limit hit the marker expects (one per limit)
PLUGIN_TIMEOUT: Final = "plugin_timeout"  # record kind: pytest-timeout's thread method ended the test
PLUGIN_TIMEOUT_SECTION: Final = "pytest-timeout: stacks at timeout"
PDB_SHOWN: Final = "pdb_shown"  # record kind: --pdb showed the failure of phase ``when`` in the sandbox
# Where the sandbox's machinery enters pytest's protocol: in a stack dump, every frame from here down is ours.
PROTOCOL_ENTRY_FRAMES: Final = ('/pytest_nsbox/compat.py"', '/pytest_nsbox/runtest.py"')


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def early_end_cause(status: int | None) -> str:
    """``nsbox_cause`` of a test that ended without reporting: ``signal:NAME`` or ``exit``."""
    if status is not None and os.WIFSIGNALED(status):
        return f"signal:{signal_name(os.WTERMSIG(status))}"
    return "exit"


def early_end_message(status: int | None, phase: str) -> str:
    """Why the test ended without reporting *phase*."""
    if status is None:
        return SANDBOX_DIED.format(detail="no status received")
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return CRASHED.format(signame=signal_name(signum), description=signal.strsignal(signum) or "unknown signal", phase=phase)
    return EXITED_EARLY.format(code=os.waitstatus_to_exitcode(status), phase=phase)


# --- reports P makes itself -----------------------------------------------------------------------


Span = tuple[float, float]
"""When a phase started and stopped (time.time()); its duration is the difference."""


def _timed(call: pytest.CallInfo[None], span: Span | None) -> pytest.CallInfo[None]:
    """*call* as if it had lasted *span* (a phase the test ran in, timed by P)."""
    if span is not None:
        call.start, call.stop = span
        call.duration = max(span[1] - span[0], 0.0)
    return call


def failure_report(
    item: pytest.Item, when: str, message: str, sections: Iterable[tuple[str, str]] = (), span: Span | None = None
) -> pytest.TestReport:
    """A failed *when* report (FAILED for call, ERROR for setup/teardown) with *message*, lasting *span*."""
    compat.evaluate_xfail(item)

    def fail() -> None:
        pytest.fail(message, pytrace=False)

    call = _timed(pytest.CallInfo.from_call(fail, when=when), span)  # type: ignore[arg-type]
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


def passed_report(item: pytest.Item, when: str, span: Span | None = None) -> pytest.TestReport:
    """An empty passed report for a phase that produced none (keeps junitxml and xdist whole)."""
    call = _timed(pytest.CallInfo.from_call(lambda: None, when=when), span)  # type: ignore[arg-type]
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
            report.user_properties[:0] = [p for p in in_sandbox.user_properties if p not in report.user_properties]
            report.start, report.duration = in_sandbox.start, in_sandbox.duration + report.duration
        return report
    in_sandbox.sections.append((OUTSIDE_TEARDOWN_SECTION, str(report.longrepr)))
    return in_sandbox


# --- limits ---------------------------------------------------------------------------------------


@dataclass
class Cause:
    """A limit the sandbox hit: the failure message and extra report sections."""

    message: str
    name: str  # nsbox_cause: memory, pids, timeout, stream
    sections: list[tuple[str, str]] = field(default_factory=list)
    reported: bool = False
    expected: bool = False  # the marker's expect_limits names it: it does not fail the test by itself


def ended_by_sigkill(result: SandboxResult) -> bool:
    """Whether the test process (C) died by SIGKILL, or its end is unknown: with OOM kills
    counted, the OOM killer may have chosen C itself, which no expect_limits covers."""
    status = result.test_status
    return status is None or (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL)


def limit_hits(spec: SandboxSpec, result: SandboxResult) -> list[Cause]:
    """Every limit the sandbox hit, from the kernel's own counters, in order: timeout, memory,
    pids, disk; each marked ``expected`` where the marker's expect_limits covers it: a memory hit
    only if the test process itself survived (a process it started was OOM-killed), a pids or disk
    hit always."""
    usage, hits = result.usage, []
    if result.timed_out:
        stack = trim_stack(result.stack)
        sections = [(STACK_SECTION, stack)] if stack else []
        hits.append(Cause(TIMED_OUT.format(seconds=spec.timeout or 0.0), "timeout", sections))
    if usage.oom_kills and spec.memory is not None:
        peak = format_size(usage.memory_peak) if usage.memory_peak is not None else "unknown"
        plural = "es" if usage.oom_kills != 1 else ""
        message = MEMORY_EXCEEDED.format(limit=format_size(spec.memory), peak=peak, count=usage.oom_kills, plural=plural)
        expected = "memory" in spec.expect_limits
        if expected and ended_by_sigkill(result):
            expected, message = False, TEST_PROCESS_OOM_KILLED.format(message=message)
        hits.append(Cause(message, "memory", expected=expected))
    if usage.pids_limit_hits:
        message = PIDS_EXCEEDED.format(limit=spec.pids or DEFAULT_PIDS, count=usage.pids_limit_hits)
        hits.append(Cause(message, "pids", expected="pids" in spec.expect_limits))
    disk = disk_full(spec, result.records, result.disk_used)
    if disk is not None:
        disk.expected = "disk" in spec.expect_limits
        hits.append(disk)
    for hit in hits:
        if hit.expected:
            hit.message = EXPECTED_HIT.format(message=hit.message)
    return hits


def disk_full(spec: SandboxSpec, records: list[dict[str, Any]], disk_used: int | None = None) -> Cause | None:
    """The disk bound was reached: when the test ended, its scratch tmpfs had (almost) no room
    or no inode left (a test that deleted what it wrote after ENOSPC is not caught); with
    scratch="disk", P found more than the bound in the scratch's directory (*disk_used*)."""
    if spec.scratch == "disk":
        if disk_used is None or spec.disk is None:
            return None  # C's look (statvfs) shows the host's filesystem there, not the bound
        detail = DISK_KILLED.format(used=format_size(disk_used))
        return Cause(DISK_FULL.format(limit=format_size(spec.disk), detail=detail), "disk")
    record = next((r for r in records if r["kind"] == DISK_USAGE), None)
    if record is None or spec.disk is None:
        return None
    free, free_inodes = record.get("free"), record.get("free_inodes")
    if type(free) is not int or type(free_inodes) is not int:
        return None  # C sent it, where the test's code runs: only plain integers count
    if free >= DISK_FULL_MARGIN and free_inodes > 0:
        return None
    detail = " (no inode left)" if free_inodes <= 0 else ""
    return Cause(DISK_FULL.format(limit=format_size(spec.disk), detail=detail), "disk")


def limit_violation(spec: SandboxSpec, result: SandboxResult) -> Cause | None:
    """Why the test must fail because of its limits (the first hit the marker does not expect)."""
    return next((hit for hit in limit_hits(spec, result) if not hit.expected), None)


def expected_note(hits: list[Cause]) -> Cause | None:
    """The expected limit hits as one cause (its message one line per limit), or None."""
    expected = [hit for hit in hits if hit.expected]
    if not expected:
        return None
    return Cause("\n".join(hit.message for hit in expected), expected[0].name, expected=True)


def with_note(got: list[pytest.TestReport], note: Cause) -> None:
    """Record expected limit hits that did not decide the outcome: a section of the first failed
    report, else of the call report (or of the last report, if there is no call)."""
    target = next((r for r in got if r.failed), None) or next((r for r in got if r.when == "call"), got[-1] if got else None)
    if target is not None:
        target.sections.append((LIMIT_SECTION, note.message))


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


def with_cause(item: pytest.Item, got: list[pytest.TestReport], cause: Cause) -> list[pytest.TestReport]:
    """Fail the test with *cause* (once): the first failed report gets it first in its message
    (the test's own traceback stays); if none failed, the call fails with it."""
    if cause.reported:
        return got
    target = next((i for i, r in enumerate(got) if r.failed), None)
    if target is None:
        target = next((i for i, r in enumerate(got) if r.when == "call"), None)
    if target is None:
        return got
    cause.reported = True
    report = got[target]
    if report.failed:
        put_first(report, cause.message)
        report.sections.extend([(LIMIT_SECTION, cause.message), *cause.sections])
        return got
    span = (report.start, report.stop)
    replaced = failure_report(item, report.when, cause.message, [*report.sections, *cause.sections], span)
    replaced.duration = report.duration
    return [*got[:target], replaced, *got[target + 1 :]]


def put_first(report: pytest.TestReport, message: str) -> None:
    """Put *message* before the failed *report*'s own: the short summary line and junit's
    failure message show it first (its first line), the full text follows."""
    longrepr = report.longrepr
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        crash.message = f"{message}\n{crash.message}"
    elif isinstance(longrepr, str):
        report.longrepr = f"{message}\n{longrepr}"


def limit_properties(spec: SandboxSpec, usage: Usage) -> list[tuple[str, object]]:
    """user_properties for junit-xml and the memory summary: the peak, and each limit the test
    asked for (see LIMIT_PROPERTIES)."""
    properties: list[tuple[str, object]] = []
    if usage.memory_peak is not None:
        properties.append(("nsbox_memory_peak", usage.memory_peak))
    for name, value in spec.requested_limits().items():
        properties.append((LIMIT_PROPERTIES[name], value))
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


def from_sandbox(
    item: pytest.Item, spec: SandboxSpec, result: SandboxResult, *, require: bool, leaks: str = LEAKS_WARN
) -> SandboxReports:
    """Turn the records of *result* into reports; add the phases never reported, the cause of a
    limit violation, and the processes the test left running (*leaks*: warn or fail)."""
    config = item.config
    out = SandboxReports()
    internal = False
    for record in result.records:
        kind = record["kind"]
        if kind == "report":
            try:
                report = compat.report_from_serializable(config, record["data"])
            except Exception as exc:  # noqa: BLE001 - the stream comes from untrusted code
                out.reports = with_failure(item, out.reports, UNUSABLE_REPORT.format(detail=exc), result)
                continue
            if record.get("phase", True):
                out.reports.append(report)
            else:
                out.others.append((len(out.reports), report))
        elif kind == "warning":
            out.warnings.append(record)
        elif kind == PDB_SHOWN:
            for report in out.reports:
                if report.when == record.get("when"):
                    compat.mark_pdb_shown(report)
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
            out.reports = with_failure(item, out.reports, text, result)
            internal = True
    properties = limit_properties(spec, result.usage)
    if result.setup_error is None:
        hits = limit_hits(spec, result)
        cause = next((hit for hit in hits if not hit.expected), None)
        if cause is None and result.wire_error:
            cause = Cause(CORRUPT_STREAM.format(detail=result.wire_error), "stream")
        if cause is None:
            cause = plugin_timeout(result.records)
        early = []
        if out.pending is None:
            early = missing_phases(item, out.reports, result, cause, after_internal_error=internal)
            out.reports.extend(early)
        if cause is not None:
            out.reports = with_cause(item, out.reports, cause)
        note = expected_note(hits)
        if note is not None:
            properties.extend((EXPECTED_PROPERTY, hit.name) for hit in hits if hit.expected)
            if cause is None and any(r.failed for r in out.reports):
                cause = note  # the test failed anyway: reported as without expect_limits, the hit first
                out.reports = with_cause(item, out.reports, note)
            else:
                with_note(out.reports, note)  # the test's own outcome stands; the hit is recorded
        left, count = leftovers(result.records)
        if left:
            listing = "\n".join(f"pid {pid}: {command}" for pid, command in left)
            if count > len(left):
                listing += f"\n... and {count - len(left)} more"
            message = LEFT_RUNNING.format(count=count, first=f"pid {left[0][0]}: {left[0][1]}"[:200])
            if leaks == LEAKS_FAIL and cause is None and all(r.passed for r in out.reports):  # never over the test's own outcome
                cause = Cause(message, "leaks", [(LEAKS_SECTION, listing)])
                out.reports = with_cause(item, out.reports, cause)
            else:
                shown = next((r for r in out.reports if r.when == "call"), out.reports[-1] if out.reports else None)
                if shown is not None:  # the call's report: -rP/-rA show its sections
                    shown.sections.append((LEAKS_SECTION, listing))
                path, lineno, _ = item.location
                warning = {"message": f"{item.nodeid}: {message}", "category": LEAKS_WARNING}
                out.warnings.append(warning | {"filename": path, "lineno": (lineno or 0) + 1})
        if cause is not None and cause.reported:
            properties.append((CAUSE_PROPERTY, cause.name))
        elif any(r.failed for r in early):
            properties.append((CAUSE_PROPERTY, early_end_cause(result.test_status)))
        elif internal:
            properties.append((CAUSE_PROPERTY, "internal"))
    for report in out.reports:
        report.user_properties.extend(properties)
    return out


def leftovers(records: list[dict[str, Any]]) -> tuple[list[tuple[int, str]], int]:
    """The processes the test left running as C listed them (the first few), and how many there
    were (checked: C runs the test's code)."""
    record = next((r for r in records if r["kind"] == LEFTOVERS), None)
    entries = record.get("processes") if record is not None else None
    found: list[tuple[int, str]] = []
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, list | tuple) and len(entry) == 2 and type(entry[0]) is int and isinstance(entry[1], str):
            found.append((entry[0], entry[1][:500]))
    count = record.get("count") if record is not None else None
    return found, max(count, len(found)) if type(count) is int else len(found)


def plugin_timeout(records: list[dict[str, Any]]) -> Cause | None:
    """pytest-timeout's thread method fired in the sandbox: its message, and the stacks."""
    record = next((r for r in records if r["kind"] == PLUGIN_TIMEOUT), None)
    if record is None:
        return None
    stack = str(record.get("stack") or "")
    return Cause(str(record.get("message")), "timeout", [(PLUGIN_TIMEOUT_SECTION, stack)] if stack else [])


def next_phase(item: pytest.Item, got: list[pytest.TestReport]) -> str | None:
    """The first phase the test should have reported and did not (None: it reported all)."""
    phases = {r.when: r for r in got}
    setup = phases.get("setup")
    if setup is None:
        return "setup"
    if setup.passed and "call" not in phases and not item.config.getoption("setuponly", False):
        return "call"
    if "teardown" not in phases:
        return "teardown"
    return None


def span_after(got: list[pytest.TestReport], result: SandboxResult) -> Span | None:
    """From the end of the last phase reported (or the start of the test) to the end of the test."""
    if result.ended is None:
        return None
    start = max((r.stop for r in got), default=result.started if result.started is not None else result.ended)
    return min(start, result.ended), result.ended


def with_failure(item: pytest.Item, got: list[pytest.TestReport], message: str, result: SandboxResult) -> list[pytest.TestReport]:
    """Fail the first phase not reported yet with *message*; after the last, fail the teardown:
    never a phase reported twice."""
    missing = next_phase(item, got)
    if missing is not None:
        return [*got, failure_report(item, missing, message, (), span_after(got, result))]
    index = max(i for i, r in enumerate(got) if r.when == "teardown")
    teardown = got[index]
    if teardown.failed:
        teardown.sections.append((INTERNAL_SECTION, message))
        return got
    failed = failure_report(item, "teardown", message, teardown.sections, (teardown.start, teardown.stop))
    return [*got[:index], failed, *got[index + 1 :]]


def missing_phases(
    item: pytest.Item,
    got: list[pytest.TestReport],
    result: SandboxResult,
    cause: Cause | None,
    *,
    after_internal_error: bool = False,
) -> list[pytest.TestReport]:
    """Reports for phases the test never reported: it crashed, exited or was killed before.
    After an internal error (a failed report already says why the test ended) they pass."""
    status = result.test_status
    complete = status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    if complete and any(r.when == "teardown" for r in got) and cause is None:
        return []
    missing = next_phase(item, got)
    if missing is None:
        return []
    span = span_after(got, result)
    end: Span | None = (span[1], span[1]) if span is not None else None
    if cause is None and after_internal_error:
        first = passed_report(item, missing, span)
    else:
        captured = _captured_sections(item.config)
        crashed = status is not None and os.WIFSIGNALED(status) and not result.timed_out
        stack = trim_stack(result.stack) if crashed else ""
        crash_sections = [(CRASH_STACK_SECTION, stack)] if stack else []
        if cause is not None:
            message, sections = cause.message, [*captured, *cause.sections, *crash_sections]
            cause.reported = True
        else:
            message, sections = early_end_message(status, missing), [*captured, *crash_sections]
        first = failure_report(item, missing, message, sections, span)
    out = [first]
    if missing != "teardown":
        out.append(passed_report(item, "teardown", end))
    return out


def _captured_sections(config: pytest.Config) -> list[tuple[str, str]]:
    """What the test wrote to the (shared) capture files before it died."""
    captured = compat.captured_so_far(config)
    if captured is None:
        return []
    return [(CAPTURED_SECTION.format(name=name), text) for name, text in zip(("stdout", "stderr"), captured, strict=True) if text]
