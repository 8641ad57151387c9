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
    assert TEST_FAILURE in text(call)  # the test's own failure stays
    assert (reports.LIMIT_SECTION, message) in call.sections
    crash_message = call.longrepr.reprcrash.message  # the short summary line's and junit's message
    assert crash_message.startswith(message + "\n") and TEST_FAILURE in crash_message


def test_limit_cause_goes_to_a_failed_setup(item: pytest.Item) -> None:
    """A fixture that hit the pids limit: the setup error carries the cause, nothing else fails."""
    records = [record(item, reports.failure_report(item, "setup", "BlockingIOError: [Errno 11]")), *sent(item, "teardown")]
    out = assemble(item, SandboxResult(records=records, test_status=exited(0), usage=PIDS_USAGE), PIDS_SPEC)
    assert outcomes(out) == [("setup", "failed"), ("teardown", "passed")]
    assert out.reports[0].longrepr.reprcrash.message.startswith(PIDS_TEXT)


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


def test_each_requested_limit_and_the_cause_are_user_properties(item: pytest.Item) -> None:
    spec = SandboxSpec(memory=64 * MiB, pids=32, cpus=0.5, timeout=2)
    result = SandboxResult(records=sent(item, "setup"), test_status=signaled(signal.SIGKILL), timed_out=True)
    properties = dict(assemble(item, result, spec).reports[-1].user_properties)
    assert properties == {
        "nsbox_memory_limit": 64 * MiB,
        "nsbox_pids_limit": 32,
        "nsbox_cpus_limit": 0.5,
        "nsbox_timeout_limit": 2,
        reports.CAUSE_PROPERTY: "timeout",
    }


@pytest.mark.parametrize(("status", "cause"), [(signaled(signal.SIGSEGV), "signal:SIGSEGV"), (exited(0), "exit"), (None, "exit")])
def test_cause_of_an_early_end(item: pytest.Item, status: int | None, cause: str) -> None:
    out = assemble(item, SandboxResult(records=sent(item, "setup"), test_status=status))
    assert all(dict(r.user_properties)[reports.CAUSE_PROPERTY] == cause for r in out.reports)


def test_a_passed_test_has_no_cause(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=sent(item, "setup", "call", "teardown"), test_status=exited(0), done=True))
    assert all(reports.CAUSE_PROPERTY not in dict(r.user_properties) for r in out.reports)


# --- expected limits (expect_limits) ----------------------------------------------------------------

EXPECT_MEMORY = SandboxSpec(memory=64 * MiB, expect_limits=("memory",))
EXPECT_PIDS = SandboxSpec(pids=32, expect_limits=("pids",))


def expected(message: str) -> str:
    return reports.EXPECTED_HIT.format(message=message)


@pytest.mark.parametrize(
    ("spec", "usage", "message", "name"),
    [(EXPECT_MEMORY, MEMORY_USAGE, MEMORY_TEXT, "memory"), (EXPECT_PIDS, PIDS_USAGE, PIDS_TEXT, "pids")],
)
def test_an_expected_limit_hit_leaves_a_passed_test_passed_and_is_recorded(
    item: pytest.Item, spec: SandboxSpec, usage: Usage, message: str, name: str
) -> None:
    result = SandboxResult(records=sent(item, "setup", "call", "teardown"), test_status=exited(0), usage=usage, done=True)
    out = assemble(item, result, spec)
    assert outcomes(out) == [("setup", "passed"), ("call", "passed"), ("teardown", "passed")]
    assert (reports.LIMIT_SECTION, expected(message)) in out.reports[1].sections
    assert "memory limit" in expected(MEMORY_TEXT) and "pids limit 32" in expected(PIDS_TEXT)  # same words
    for report in out.reports:
        properties = dict(report.user_properties)
        assert properties[reports.EXPECTED_PROPERTY] == name and reports.CAUSE_PROPERTY not in properties


@pytest.mark.parametrize(
    ("spec", "usage", "message"), [(EXPECT_MEMORY, MEMORY_USAGE, MEMORY_TEXT), (EXPECT_PIDS, PIDS_USAGE, PIDS_TEXT)]
)
def test_a_test_failing_by_itself_after_an_expected_hit_shows_the_hit_first(
    item: pytest.Item, spec: SandboxSpec, usage: Usage, message: str
) -> None:
    """As without expect_limits: the hit leads the short summary line and junit's message."""
    records = sent(item, "setup", "call", "teardown", failed_call=True)
    out = assemble(item, SandboxResult(records=records, test_status=exited(0), usage=usage), spec)
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
    call = out.reports[1]
    assert TEST_FAILURE in text(call)
    assert call.longrepr.reprcrash.message.startswith(expected(message) + "\n")
    assert (reports.LIMIT_SECTION, expected(message)) in call.sections
    properties = dict(call.user_properties)
    assert properties[reports.CAUSE_PROPERTY] == spec.expect_limits[0]
    assert properties[reports.EXPECTED_PROPERTY] == spec.expect_limits[0]


def test_the_test_process_itself_oom_killed_fails_even_when_memory_is_expected(item: pytest.Item) -> None:
    result = SandboxResult(records=sent(item, "setup"), test_status=signaled(signal.SIGKILL), usage=MEMORY_USAGE)
    out = assemble(item, result, EXPECT_MEMORY)
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
    message = text(out.reports[1])
    assert message == reports.TEST_PROCESS_OOM_KILLED.format(message=MEMORY_TEXT)
    assert message.startswith(MEMORY_TEXT)
    properties = dict(out.reports[1].user_properties)
    assert properties[reports.CAUSE_PROPERTY] == "memory" and reports.EXPECTED_PROPERTY not in properties


def test_the_test_process_killed_after_its_call_passed_is_not_covered_either(item: pytest.Item) -> None:
    result = SandboxResult(records=sent(item, "setup", "call"), test_status=signaled(signal.SIGKILL), usage=MEMORY_USAGE)
    out = assemble(item, result, EXPECT_MEMORY)
    assert outcomes(out) == [("setup", "passed"), ("call", "passed"), ("teardown", "failed")]
    assert text(out.reports[2]).startswith(MEMORY_TEXT)


def test_an_unexpected_hit_fails_the_test_and_the_expected_one_is_a_section(item: pytest.Item) -> None:
    spec = SandboxSpec(memory=64 * MiB, pids=32, expect_limits=("pids",))
    usage = Usage(memory_peak=64 * MiB, oom_kills=2, pids_limit_hits=3)
    result = SandboxResult(records=sent(item, "setup", "call", "teardown"), test_status=exited(0), usage=usage)
    out = assemble(item, result, spec)
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
    call = out.reports[1]
    assert text(call) == MEMORY_TEXT
    assert (reports.LIMIT_SECTION, expected(PIDS_TEXT)) in call.sections
    properties = dict(call.user_properties)
    assert properties[reports.CAUSE_PROPERTY] == "memory" and properties[reports.EXPECTED_PROPERTY] == "pids"


def test_both_limits_expected_are_both_recorded(item: pytest.Item) -> None:
    spec = SandboxSpec(memory=64 * MiB, pids=32, expect_limits=("memory", "pids"))
    usage = Usage(memory_peak=64 * MiB, oom_kills=2, pids_limit_hits=3)
    result = SandboxResult(records=sent(item, "setup", "call", "teardown"), test_status=exited(0), usage=usage, done=True)
    out = assemble(item, result, spec)
    assert outcomes(out) == [("setup", "passed"), ("call", "passed"), ("teardown", "passed")]
    assert (reports.LIMIT_SECTION, expected(MEMORY_TEXT) + "\n" + expected(PIDS_TEXT)) in out.reports[1].sections
    assert [v for k, v in out.reports[0].user_properties if k == reports.EXPECTED_PROPERTY] == ["memory", "pids"]


def test_an_expected_limit_not_hit_adds_nothing(item: pytest.Item) -> None:
    result = SandboxResult(records=sent(item, "setup", "call", "teardown"), test_status=exited(0), usage=Usage(memory_peak=MiB))
    out = assemble(item, result, EXPECT_MEMORY)
    assert all(not r.sections for r in out.reports)
    assert all(reports.EXPECTED_PROPERTY not in dict(r.user_properties) for r in out.reports)


def test_an_expected_full_disk_leaves_a_passed_test_passed(item: pytest.Item) -> None:
    spec = SandboxSpec(disk=8 * MiB, expect_limits=("disk",))
    records = [*sent(item, "setup", "call", "teardown"), {"kind": reports.DISK_USAGE, "free": 0, "free_inodes": 10}]
    out = assemble(item, SandboxResult(records=records, test_status=exited(0), done=True), spec)
    assert outcomes(out) == [("setup", "passed"), ("call", "passed"), ("teardown", "passed")]
    disk_text = reports.DISK_FULL.format(limit="8 MiB", detail="")
    assert (reports.LIMIT_SECTION, expected(disk_text)) in out.reports[1].sections
    assert dict(out.reports[1].user_properties)[reports.EXPECTED_PROPERTY] == "disk"
    unexpected = assemble(item, SandboxResult(records=records, test_status=exited(0), done=True), SandboxSpec(disk=8 * MiB))
    assert text(unexpected.reports[1]) == disk_text


def test_a_timeout_is_never_expected(item: pytest.Item) -> None:
    spec = SandboxSpec(pids=32, timeout=2, expect_limits=("pids",))
    result = SandboxResult(records=sent(item, "setup"), test_status=signaled(signal.SIGKILL), timed_out=True, usage=PIDS_USAGE)
    out = assemble(item, result, spec)
    assert text(out.reports[1]) == reports.TIMED_OUT.format(seconds=2.0)
    assert (reports.LIMIT_SECTION, expected(PIDS_TEXT)) in out.reports[1].sections


# --- durations ------------------------------------------------------------------------------------


def test_a_phase_never_reported_lasts_from_the_last_report_to_the_end_of_the_test(item: pytest.Item) -> None:
    records = sent(item, "setup")
    setup_stop = records[0]["data"]["stop"]
    result = SandboxResult(records=records, test_status=signaled(signal.SIGKILL), started=setup_stop - 1, ended=setup_stop + 7.5)
    _, call, teardown = assemble(item, result, MEMORY_SPEC).reports
    assert (call.start, call.stop, call.duration) == (setup_stop, setup_stop + 7.5, 7.5)
    assert (teardown.start, teardown.stop, teardown.duration) == (setup_stop + 7.5, setup_stop + 7.5, 0.0)


def test_a_test_that_never_reported_lasts_from_its_start(item: pytest.Item) -> None:
    result = SandboxResult(records=[], test_status=signaled(signal.SIGSEGV), started=1000.0, ended=1003.0)
    setup, teardown = assemble(item, result).reports
    assert (setup.when, setup.start, setup.duration) == ("setup", 1000.0, 3.0)
    assert (teardown.start, teardown.duration) == (1003.0, 0.0)


def test_a_limit_failing_a_passed_call_keeps_its_duration(item: pytest.Item) -> None:
    records = sent(item, "setup", "call", "teardown")
    records[1]["data"].update(start=100.0, stop=104.0, duration=4.0)
    out = assemble(item, SandboxResult(records=records, test_status=exited(0), usage=PIDS_USAGE), PIDS_SPEC)
    call = out.reports[1]
    assert call.failed and (call.start, call.stop, call.duration) == (100.0, 104.0, 4.0)


def test_crash_dump_is_a_section_without_our_frames(item: pytest.Item) -> None:
    dump = "Fatal Python error: Segmentation fault\n\n" + STACK + '  File "/x/pytest_nsbox/runtest.py", line 9 in run\n'
    out = assemble(item, SandboxResult(records=sent(item, "setup"), test_status=signaled(signal.SIGSEGV), stack=dump))
    assert (reports.CRASH_STACK_SECTION, "Fatal Python error: Segmentation fault\n\n" + STACK.strip()) in out.reports[1].sections


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


BROKEN = {"kind": "internal_error", "process": "C", "traceback": "Traceback: ValueError"}
BROKEN_TEXT = reports.INTERNAL_ERROR.format(process="C", traceback="Traceback: ValueError")


def test_internal_error_before_the_call_report_fails_the_call(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=[*sent(item, "setup"), BROKEN], test_status=exited(126)))
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
    assert text(out.reports[1]) == BROKEN_TEXT


def test_internal_error_after_the_call_report_is_an_error_at_teardown_never_a_second_call(item: pytest.Item) -> None:
    """As with --pdb: C sent the failed call, then pytest_exception_interact raised."""
    records = [*sent(item, "setup", "call", failed_call=True), BROKEN]
    out = assemble(item, SandboxResult(records=records, test_status=exited(126)))
    assert outcomes(out) == [("setup", "passed"), ("call", "failed"), ("teardown", "failed")]
    assert TEST_FAILURE in text(out.reports[1]) and text(out.reports[2]) == BROKEN_TEXT
    assert dict(out.reports[2].user_properties)[reports.CAUSE_PROPERTY] == "internal"


def test_internal_error_after_every_phase_fails_the_teardown(item: pytest.Item) -> None:
    out = assemble(item, SandboxResult(records=[*sent(item, "setup", "call", "teardown"), BROKEN], test_status=exited(0)))
    assert outcomes(out) == [("setup", "passed"), ("call", "passed"), ("teardown", "failed")]
    assert text(out.reports[2]) == BROKEN_TEXT


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
