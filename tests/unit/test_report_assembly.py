"""Report assembly from canned sandbox results: real pytest items in-process, no fork.

The records are what C would send: reports serialized by ``pytest_report_to_serializable``.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from pytest_nsbox import reports
from pytest_nsbox.box.cgroups import Usage
from pytest_nsbox.box.config import SandboxResult
from pytest_nsbox.spec import DEFAULT_PIDS, SandboxSpec, format_size

SOURCE = """
import pytest

def test_func():
    pass

@pytest.mark.xfail(reason="crashes sometimes")
def test_xfail():
    pass
"""
MiB = 2**20
TEST_FAILURE = "assert 41 + 1 == 43"
STACK = 'Current thread 0x00007f2 (most recent call first):\n  File "/t/test_a.py", line 29 in test_func\n'


def exited(code: int) -> int:
    """The wait status of a process that exited with *code*."""
    return code << 8


def signaled(signum: int) -> int:
    """The wait status of a process killed by *signum* (no core dump)."""
    return signum


@pytest.fixture
def item(pytester: pytest.Pytester) -> pytest.Item:
    return pytester.getitem(SOURCE)


def record(item: pytest.Item, report: pytest.TestReport) -> dict[str, Any]:
    return {"kind": "report", "data": item.config.hook.pytest_report_to_serializable(config=item.config, report=report)}


def sent(item: pytest.Item, *phases: str, failed_call: bool = False) -> list[dict[str, Any]]:
    """Records of passed *phases* as C sends them (the call failed if *failed_call*)."""
    out = []
    for when in phases:
        if when == "call" and failed_call:
            out.append(record(item, reports.failure_report(item, "call", TEST_FAILURE)))
        else:
            out.append(record(item, reports.passed_report(item, when)))
    return out


def assemble(item: pytest.Item, result: SandboxResult, spec: SandboxSpec | None = None, *, require: bool = False):
    return reports.from_sandbox(item, spec or SandboxSpec(), result, require=require)


def outcomes(out: reports.SandboxReports) -> list[tuple[str, str]]:
    return [(r.when, r.outcome) for r in out.reports]


def text(report: pytest.TestReport) -> str:
    """The report's message (a skip's longrepr is (path, lineno, message))."""
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


def test_wait_status_helpers_match_the_kernels_encoding() -> None:
    assert os.WIFEXITED(exited(3)) and os.waitstatus_to_exitcode(exited(3)) == 3
    assert os.WIFSIGNALED(signaled(signal.SIGSEGV)) and os.WTERMSIG(signaled(signal.SIGSEGV)) == signal.SIGSEGV


# --- phases -----------------------------------------------------------------------------------------


def test_all_three_phases_reported_adds_nothing(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=sent(item, "setup", "call", "teardown"), test_status=exited(0), done=True))
    assert outcomes(out) == [("setup", "passed"), ("call", "passed"), ("teardown", "passed")]
    assert out.pending is None and out.warnings == []
    assert all(r.nodeid == item.nodeid and r.user_properties == [] for r in out.reports)


def test_failed_call_passes_through(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=sent(item, "setup", "call", "teardown", failed_call=True), test_status=exited(0)))
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
    assert TEST_FAILURE in text(out.reports[1])


def test_missing_teardown_after_a_passed_call_is_an_error_at_teardown(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=sent(item, "setup", "call"), test_status=exited(0)))
    assert outcomes(out) == [("setup", "passed"), ("call", "passed"), ("teardown", "failed")]
    assert reports.EXITED_EARLY.format(code=0, phase="teardown") in text(out.reports[2])


def test_crash_during_call_fails_the_call_and_passes_teardown(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=sent(item, "setup"), test_status=signaled(signal.SIGSEGV)))
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
    crashed = reports.CRASHED.format(signame="SIGSEGV", description=signal.strsignal(signal.SIGSEGV), phase="call")
    assert crashed in text(out.reports[1])


def other_report(item: pytest.Item, note: str) -> dict[str, Any]:
    """A report the test logged itself (a subtest's, another plugin's): a call report, not a phase."""
    report = reports.passed_report(item, "call")
    report.sections.append(("note", note))
    return {**record(item, report), "phase": False}


def test_crash_after_a_subtest_fails_the_call_the_protocol_never_reported(item: pytest.Item) -> None:
    records = [*sent(item, "setup"), other_report(item, "sub 1")]
    out = assemble(item, SandboxResult(records=records, test_status=signaled(signal.SIGSEGV)))
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
    assert "SIGSEGV" in text(out.reports[1])


def test_other_reports_are_logged_where_c_logged_them(item: pytest.Item) -> None:
    setup, call, teardown = sent(item, "setup", "call", "teardown")
    records = [setup, other_report(item, "sub 1"), other_report(item, "sub 2"), call, teardown]
    out = assemble(item, SandboxResult(records=records, test_status=exited(0), done=True))
    assert outcomes(out) == [("setup", "passed"), ("call", "passed"), ("teardown", "passed")]
    ordered = out.in_order()
    assert [dict(r.sections).get("note", r.when) for r in ordered] == ["setup", "sub 1", "sub 2", "call", "teardown"]
    assert ordered[0] is out.reports[0] and ordered[3] is out.reports[1]


def test_crash_after_call_is_an_error_at_teardown(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=sent(item, "setup", "call"), test_status=signaled(signal.SIGKILL)))
    assert outcomes(out) == [("setup", "passed"), ("call", "passed"), ("teardown", "failed")]
    crashed = reports.CRASHED.format(signame="SIGKILL", description=signal.strsignal(signal.SIGKILL), phase="teardown")
    assert crashed in text(out.reports[2])


def test_crash_of_an_xfail_test_is_xfailed(pytester: pytest.Pytester) -> None:
    item = pytester.getitem(SOURCE, "test_xfail")
    out = assemble(item, SandboxResult(records=sent(item, "setup"), test_status=signaled(signal.SIGABRT)))
    call = out.reports[1]
    assert call.when == "call" and call.skipped and call.wasxfail == "crashes sometimes"


def test_exit_before_call_fails_the_call(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=sent(item, "setup"), test_status=exited(3)))
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
    assert reports.EXITED_EARLY.format(code=3, phase="call") in text(out.reports[1])


def test_exit_before_setup_is_an_error_at_setup(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=[], test_status=exited(0)))
    assert outcomes(out) == [("setup", "failed"), ("teardown", "passed")]
    assert reports.EXITED_EARLY.format(code=0, phase="setup") in text(out.reports[0])


def test_no_status_at_all_says_the_sandbox_died(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=sent(item, "setup"), test_status=None))
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
    assert reports.SANDBOX_DIED.format(detail="no status received") in text(out.reports[1])


# --- limits -----------------------------------------------------------------------------------------

MEMORY_SPEC = SandboxSpec(memory=64 * MiB)
MEMORY_USAGE = Usage(memory_peak=64 * MiB, oom_kills=2)
MEMORY_TEXT = reports.MEMORY_EXCEEDED.format(limit="64 MiB", peak=format_size(64 * MiB), count=2, plural="es")
PIDS_SPEC = SandboxSpec(pids=32)
PIDS_USAGE = Usage(pids_limit_hits=3)
PIDS_TEXT = reports.PIDS_EXCEEDED.format(limit=32, count=3)


def test_memory_message_has_the_limit_and_the_peak() -> None:
    assert "memory limit" in MEMORY_TEXT and "64 MiB" in MEMORY_TEXT and "peak 64 MiB" in MEMORY_TEXT
    assert "pids limit" in PIDS_TEXT and "32" in PIDS_TEXT


@pytest.mark.parametrize(
    ("spec", "usage", "message"), [(MEMORY_SPEC, MEMORY_USAGE, MEMORY_TEXT), (PIDS_SPEC, PIDS_USAGE, PIDS_TEXT)]
)
def test_limit_hit_fails_a_passed_call(item: pytest.Item, spec: SandboxSpec, usage: Usage, message: str) -> None:
    result = SandboxResult(records=sent(item, "setup", "call", "teardown"), test_status=exited(0), usage=usage)
    out = assemble(item, result, spec)
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
    assert text(out.reports[1]) == message


@pytest.mark.parametrize(
    ("spec", "usage", "message"), [(MEMORY_SPEC, MEMORY_USAGE, MEMORY_TEXT), (PIDS_SPEC, PIDS_USAGE, PIDS_TEXT)]
)
def test_limit_hit_is_a_section_of_a_failed_call(item: pytest.Item, spec: SandboxSpec, usage: Usage, message: str) -> None:
    records = sent(item, "setup", "call", "teardown", failed_call=True)
    out = assemble(item, SandboxResult(records=records, test_status=exited(0), usage=usage), spec)
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
    call = out.reports[1]
    assert TEST_FAILURE in text(call)  # the test's own failure stays the message
    assert (reports.LIMIT_SECTION, message) in call.sections


def test_pids_limit_hit_without_an_explicit_limit_names_the_default(item: pytest.Item) -> None:
    result = SandboxResult(records=sent(item, "setup", "call", "teardown"), test_status=exited(0), usage=PIDS_USAGE)
    out = assemble(item, result, SandboxSpec())
    assert text(out.reports[1]) == reports.PIDS_EXCEEDED.format(limit=DEFAULT_PIDS, count=3)


def test_oom_killed_mid_call_fails_the_call_with_the_memory_message(item: pytest.Item) -> None:
    result = SandboxResult(records=sent(item, "setup"), test_status=signaled(signal.SIGKILL), usage=MEMORY_USAGE)
    out = assemble(item, result, MEMORY_SPEC)
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
    assert text(out.reports[1]) == MEMORY_TEXT


def test_timeout_during_call_fails_it_with_the_stack(item: pytest.Item) -> None:
    stack = STACK + '  File "/x/pytest_nsbox/compat.py", line 70 in run_protocol\n'
    result = SandboxResult(records=sent(item, "setup"), test_status=signaled(signal.SIGKILL), timed_out=True, stack=stack)
    out = assemble(item, result, SandboxSpec(timeout=2))
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
    call = out.reports[1]
    assert text(call) == reports.TIMED_OUT.format(seconds=2.0)
    assert (reports.STACK_SECTION, STACK.strip()) in call.sections  # our own frames trimmed


def test_timeout_after_a_passed_call_is_an_error_at_teardown(item: pytest.Item) -> None:
    result = SandboxResult(records=sent(item, "setup", "call"), test_status=signaled(signal.SIGKILL), timed_out=True, stack=STACK)
    out = assemble(item, result, SandboxSpec(timeout=2))
    assert outcomes(out) == [("setup", "passed"), ("call", "passed"), ("teardown", "failed")]
    assert text(out.reports[2]) == reports.TIMED_OUT.format(seconds=2.0)
    assert (reports.STACK_SECTION, STACK.strip()) in out.reports[2].sections


def test_timeout_of_a_failed_call_is_a_section(item: pytest.Item) -> None:
    records = sent(item, "setup", "call", "teardown", failed_call=True)
    out = assemble(
        item, SandboxResult(records=records, test_status=exited(0), timed_out=True, stack=STACK), SandboxSpec(timeout=2)
    )
    assert (reports.LIMIT_SECTION, reports.TIMED_OUT.format(seconds=2.0)) in out.reports[1].sections
    assert TEST_FAILURE in text(out.reports[1])


def test_memory_peak_and_limit_are_user_properties_of_every_report(item: pytest.Item) -> None:
    result = SandboxResult(
        records=sent(item, "setup", "call", "teardown"), test_status=exited(0), usage=Usage(memory_peak=10 * MiB)
    )
    out = assemble(item, result, MEMORY_SPEC)
    assert outcomes(out) == [("setup", "passed"), ("call", "passed"), ("teardown", "passed")]
    for report in out.reports:
        assert report.user_properties == [("nsbox_memory_peak", 10 * MiB), ("nsbox_memory_limit", 64 * MiB)]


# --- what went wrong in the sandbox -------------------------------------------------------------------


def test_wire_error_fails_a_passed_call_as_a_corrupt_stream(item: pytest.Item) -> None:
    result = SandboxResult(
        records=sent(item, "setup", "call", "teardown"), test_status=exited(0), wire_error="undecodable record"
    )
    out = assemble(item, result)
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
    assert text(out.reports[1]) == reports.CORRUPT_STREAM.format(detail="undecodable record")


def test_wire_error_before_call_fails_the_missing_call(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=sent(item, "setup"), test_status=exited(0), wire_error="record of 9 bytes"))
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
    assert text(out.reports[1]) == reports.CORRUPT_STREAM.format(detail="record of 9 bytes")


SETUP_ERROR = {"kind": "setup_error", "step": "mount_overlay", "errno": None, "message": "mount src=overlay: boom"}


def test_setup_error_is_a_skip(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=[SETUP_ERROR], test_status=None, sandbox_status=exited(125)))
    assert outcomes(out) == [("setup", "skipped")]
    assert reports.SETUP_FAILED.format(step="mount_overlay", message="mount src=overlay: boom") in text(out.reports[0])
    assert reports.REQUIRE_NOTE not in text(out.reports[0])


def test_setup_error_under_require_is_an_error(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=[SETUP_ERROR], test_status=None), require=True)
    assert outcomes(out) == [("setup", "failed")]
    message = text(out.reports[0])
    assert reports.SETUP_FAILED.format(step="mount_overlay", message="mount src=overlay: boom") in message
    assert message.endswith(reports.REQUIRE_NOTE)


def test_setup_error_replaces_what_was_reported_before(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=[*sent(item, "setup"), SETUP_ERROR], test_status=None))
    assert outcomes(out) == [("setup", "skipped")]


def test_failed_verification_is_an_error_never_a_skip(item: pytest.Item) -> None:
    refused = {"kind": "setup_error", "step": "verify_sandbox", "message": "hostname is 'host'"}
    out = assemble(item, SandboxResult(records=[refused], test_status=None))
    assert outcomes(out) == [("setup", "failed")]
    assert text(out.reports[0]) == reports.NOT_INSIDE.format(message="hostname is 'host'")


def test_internal_error_is_a_failed_call(item: pytest.Item) -> None:
    broken = {"kind": "internal_error", "process": "C", "traceback": "Traceback: ValueError"}
    out = assemble(item, SandboxResult(records=[*sent(item, "setup", "call", "teardown"), broken], test_status=exited(0)))
    failed = [r for r in out.reports if r.failed]
    assert [r.when for r in failed] == ["call"]
    assert text(failed[0]) == reports.INTERNAL_ERROR.format(process="C", traceback="Traceback: ValueError")


def test_unusable_report_is_a_failed_call(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=[{"kind": "report", "data": {"$report_type": "Nonsense"}}], test_status=exited(0)))
    assert reports.UNUSABLE_REPORT.split("(")[0] in text(out.reports[0])
    assert out.reports[0].failed


def test_warnings_are_kept_for_replay(item: pytest.Item) -> None:
    warning = {"kind": "warning", "category": "builtins:UserWarning", "message": "beware"}
    out = assemble(item, SandboxResult(records=[*sent(item, "setup", "call", "teardown"), warning], test_status=exited(0)))
    assert out.warnings == [warning]
    assert len(out.reports) == 3


# --- exit and interrupt -----------------------------------------------------------------------------


def test_pytest_exit_inside_is_pending_and_adds_no_phases(item: pytest.Item) -> None:
    stop = {"kind": "exit", "msg": "stop right here", "returncode": 7}
    out = assemble(item, SandboxResult(records=[*sent(item, "setup"), stop], test_status=exited(0)))
    assert outcomes(out) == [("setup", "passed")]
    assert isinstance(out.pending, pytest.exit.Exception)
    assert out.pending.msg == "stop right here" and out.pending.returncode == 7


def test_keyboard_interrupt_inside_is_pending(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=[*sent(item, "setup"), {"kind": "interrupt"}], test_status=exited(2)))
    assert outcomes(out) == [("setup", "passed")]
    assert isinstance(out.pending, KeyboardInterrupt)


# --- teardown outside the sandbox -------------------------------------------------------------------


def _raise(message: str) -> None:
    raise RuntimeError(message)


def test_merge_teardown_prefers_the_outside_error_of_a_passed_teardown(item: pytest.Item) -> None:
    inside = reports.passed_report(item, "teardown")
    inside.sections.append(("Captured stdout teardown", "inside"))
    outside = pytest.CallInfo.from_call(lambda: _raise("module teardown broke"), when="teardown")
    merged = reports.merge_teardown(item, inside, outside)
    assert merged.failed and "module teardown broke" in text(merged)
    assert merged.sections[0] == ("Captured stdout teardown", "inside")


def test_merge_teardown_keeps_the_sandboxs_failure_and_adds_the_outside_one(item: pytest.Item) -> None:
    inside = reports.failure_report(item, "teardown", "fixture teardown broke")
    outside = pytest.CallInfo.from_call(lambda: _raise("module teardown broke"), when="teardown")
    merged = reports.merge_teardown(item, inside, outside)
    assert merged is inside and "fixture teardown broke" in text(merged)
    assert [name for name, _ in merged.sections] == [reports.OUTSIDE_TEARDOWN_SECTION]
    assert "module teardown broke" in merged.sections[0][1]


def test_merge_teardown_without_reports_is_a_passed_teardown(item: pytest.Item) -> None:
    merged = reports.merge_teardown(item, None, pytest.CallInfo.from_call(lambda: None, when="teardown"))
    assert merged.when == "teardown" and merged.passed
