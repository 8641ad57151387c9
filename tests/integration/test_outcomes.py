"""A sandboxed test's outcomes are pytest's: failures, crashes, early exits, skips, xfail, exit."""

from __future__ import annotations

import pytest
from helpers import junit_cases, phase_durations

from pytest_nsbox import reports

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns, pytest.mark.both_build_modes]


def test_pass_fail_and_captured_output(run_inner) -> None:
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox
        def test_ok():
            print("out from inside")

        @pytest.mark.nsbox
        def test_assertion():
            value = 41
            assert value + 1 == 43
        """
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*assert (41 + 1) == 43*", "test_inner.py:*: AssertionError", "*out from inside*"])


@pytest.mark.parametrize(
    ("body", "signame"),
    [
        ("os.kill(os.getpid(), signal.SIGSEGV)", "SIGSEGV"),
        ("os.abort()", "SIGABRT"),
        ("os.kill(os.getpid(), signal.SIGKILL)", "SIGKILL"),
    ],
)
def test_crash_by_signal_is_failed_with_its_name(run_inner, body: str, signame: str) -> None:
    result = run_inner(
        f"""
        import os, signal, sys, pytest

        @pytest.mark.nsbox
        def test_crash():
            print("written before the crash")
            sys.stdout.flush()
            {body}

        def test_after():
            pass
        """
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([f"*crashed with signal {signame}*during call*", "*written before the crash*"])


def test_crash_and_early_exit_report_the_time_the_test_ran(run_inner, pytester: pytest.Pytester) -> None:
    """Each test runs at least one second before it ends unreported: its call lasted that long
    (a lower bound only: contention can make it longer, never shorter)."""
    result = run_inner(
        """
        import os, signal, time, pytest

        @pytest.mark.nsbox
        def test_segfault():
            time.sleep(1)
            os.kill(os.getpid(), signal.SIGSEGV)

        @pytest.mark.nsbox
        def test_killed():
            time.sleep(1)
            os.kill(os.getpid(), signal.SIGKILL)

        @pytest.mark.nsbox
        def test_exits():
            time.sleep(1)
            os._exit(0)
        """,
        "--junitxml=junit.xml",
        "--durations=0",
    )
    result.assert_outcomes(failed=3)
    cases = junit_cases(pytester.path / "junit.xml")
    calls = phase_durations(result.stdout.str(), "call")
    for name, cause in (("test_segfault", "signal:SIGSEGV"), ("test_killed", "signal:SIGKILL"), ("test_exits", "exit")):
        assert cases[name].time >= 1.0 and calls[name] >= 1.0, (name, cases[name], calls.get(name))
        assert cases[name].properties[reports.CAUSE_PROPERTY] == cause
    assert "signal SIGSEGV" in str(cases["test_segfault"].message)


@pytest.mark.parametrize("crash", ["ctypes.string_at(0)", "faulthandler._sigsegv()"])
def test_crash_dump_is_a_report_section_not_raw_on_the_terminal(run_inner, crash: str) -> None:
    result = run_inner(
        f"""
        import ctypes, faulthandler, pytest

        @pytest.mark.nsbox
        def test_segv():
            {crash}
        """
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*crashed with signal SIGSEGV*during call*",
            f"*{reports.CRASH_STACK_SECTION}*",
            "Fatal Python error: Segmentation fault",
            "*test_inner.py*in test_segv",
        ]
    )
    section = result.stdout.str().split(reports.CRASH_STACK_SECTION, 1)[1].split("short test summary info", 1)[0]
    assert "/pytest_nsbox/" not in section  # our own frames trimmed
    assert "Fatal Python error" not in result.stderr.str() + result.stdout.str().split(reports.CRASH_STACK_SECTION)[0]


def test_internal_error_after_the_call_report_never_reports_the_call_twice(run_inner, pytester: pytest.Pytester) -> None:
    """As --pdb did: the failed call was sent, then pytest_exception_interact raised in the sandbox."""
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox
        def test_fails():
            assert 0, "the test's own failure"
        """,
        "--junitxml=junit.xml",
        conftest="""
        def pytest_exception_interact(node, call, report):
            raise OSError(9, "Bad file descriptor")
        """,
    )
    result.assert_outcomes(failed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_fails*", "*internal error in the sandbox (C)*", "*OSError: [[]Errno 9[]] Bad file*"]
    )
    result.stdout.no_fnmatch_line("*exited with status*")
    assert result.stdout.str().count("FAILED test_inner.py::test_fails") == 1
    assert junit_cases(pytester.path / "junit.xml")["test_fails"].properties[reports.CAUSE_PROPERTY] == "internal"


def test_exit_before_reporting_is_failed_never_passed(run_inner) -> None:
    result = run_inner(
        """
        import os, pytest

        @pytest.mark.nsbox
        def test_exit_zero():
            os._exit(0)

        @pytest.mark.nsbox
        def test_exit_three():
            os._exit(3)

        @pytest.fixture
        def leaves():
            yield
            os._exit(0)

        @pytest.mark.nsbox
        def test_exit_in_teardown(leaves):
            pass
        """
    )
    result.assert_outcomes(failed=2, passed=1, errors=1)
    text = reports.EXITED_EARLY.format(code=0, phase="call", fmt="")
    for line in (text, "exited with status 3 during call", "exited with status 0 during teardown"):
        result.stdout.fnmatch_lines([f"*{line}*"])


def test_skip_xfail_and_crashing_xfail_keep_their_meaning(run_inner) -> None:
    result = run_inner(
        """
        import os, pytest

        @pytest.mark.nsbox
        def test_skip():
            pytest.skip("not today")

        @pytest.mark.nsbox
        @pytest.mark.xfail(reason="known bug")
        def test_xfail():
            assert False

        @pytest.mark.nsbox
        @pytest.mark.xfail(reason="crashes")
        def test_xfail_crash():
            os.abort()

        @pytest.mark.nsbox
        @pytest.mark.xfail(reason="should fail", strict=True)
        def test_xpass_strict():
            pass

        @pytest.mark.nsbox
        @pytest.mark.skipif("True", reason="condition")
        def test_skipif():
            raise AssertionError("must not run")
        """
    )
    result.assert_outcomes(skipped=2, xfailed=2, failed=1)
    result.stdout.fnmatch_lines(["*XPASS(strict)*should fail*"])


def test_pytest_exit_inside_ends_the_session(run_inner) -> None:
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox
        def test_first():
            pytest.exit("stop right here", returncode=7)

        def test_never():
            raise AssertionError("must not run")
        """
    )
    assert result.ret == 7
    result.stdout.fnmatch_lines(["*stop right here*"])
    result.stdout.no_fnmatch_line("*must not run*")


def test_keyboard_interrupt_inside_interrupts_the_session(run_inner) -> None:
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox
        def test_interrupt():
            raise KeyboardInterrupt

        def test_never():
            pass
        """
    )
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*KeyboardInterrupt*"])


def test_warnings_reach_the_summary(run_inner) -> None:
    result = run_inner(
        """
        import warnings, pytest

        @pytest.mark.nsbox
        def test_warn():
            warnings.warn("beware of the sandbox", DeprecationWarning)
        """
    )
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*DeprecationWarning: beware of the sandbox*"])


def test_fixture_scopes(run_inner, pytester: pytest.Pytester) -> None:
    """Session/module fixtures run once in the pytest process; function fixtures in the sandbox."""
    log = pytester.path / "fixture.log"
    result = run_inner(
        f"""
        import os, socket, pytest

        def note(text):
            with open({str(log)!r}, "a") as f:
                f.write(text + "\\n")

        @pytest.fixture(scope="session")
        def session_value():
            note(f"session setup on {{socket.gethostname()}}")
            yield 42
            note("session teardown")

        @pytest.fixture(scope="module")
        def module_value(session_value):
            note("module setup")
            yield session_value + 1
            note("module teardown")

        @pytest.fixture
        def function_value(tmp_path):
            assert socket.gethostname() == "nsbox"
            return tmp_path

        @pytest.mark.nsbox
        @pytest.mark.parametrize("n", range(3))
        def test_uses(module_value, function_value, n):
            assert module_value == 43
            assert socket.gethostname() == "nsbox"

        def test_unmarked_shares_them(module_value):
            assert module_value == 43
        """.replace("{{socket.gethostname()}}", "{socket.gethostname()}")
    )
    result.assert_outcomes(passed=4)
    lines = log.read_text().splitlines()
    assert lines == [
        f"session setup on {__import__('socket').gethostname()}",
        "module setup",
        "module teardown",
        "session teardown",
    ]


def test_wider_fixture_errors_are_setup_errors(run_inner) -> None:
    result = run_inner(
        """
        import pytest

        @pytest.fixture(scope="module")
        def broken():
            raise RuntimeError("module fixture broke")

        @pytest.fixture(scope="module")
        def bad_teardown():
            yield
            raise RuntimeError("module teardown broke")

        @pytest.mark.nsbox
        def test_a(broken):
            pass

        @pytest.mark.nsbox
        def test_b(bad_teardown):
            pass
        """
    )
    result.assert_outcomes(errors=2, passed=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at setup of test_a*", "*module fixture broke*", "*ERROR at teardown of test_b*", "*module teardown broke*"]
    )


def test_junitxml_and_exitfirst(run_inner, pytester: pytest.Pytester) -> None:
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox
        def test_one():
            print("junit sees this")

        @pytest.mark.nsbox
        def test_two():
            assert 0, "second fails"

        @pytest.mark.nsbox
        def test_three():
            pass
        """,
        "--junitxml=report.xml",
        "-x",
        "-o",
        "junit_logging=all",
    )
    result.assert_outcomes(passed=1, failed=1)
    xml = (pytester.path / "report.xml").read_text()
    assert 'tests="2"' in xml and "junit sees this" in xml and "second fails" in xml


def test_sandbox_finished_hook_sees_the_test_status(run_inner, pytester: pytest.Pytester) -> None:
    """B reports C's wait status; a plugin sees it (exit 0 for a passing test, the signal for a crash)."""
    result = run_inner(
        """
        import os, signal, pytest

        @pytest.mark.nsbox
        def test_ok():
            pass

        @pytest.mark.nsbox
        def test_killed():
            os.kill(os.getpid(), signal.SIGKILL)
        """,
        conftest="""
        def pytest_nsbox_sandbox_finished(item, spec, result):
            with open("statuses.txt", "a") as f:
                f.write(f"{item.name} {result.test_status}\\n")
        """,
    )
    result.assert_outcomes(passed=1, failed=1)
    assert (pytester.path / "statuses.txt").read_text().splitlines() == ["test_ok 0", "test_killed 9"]


def test_garbage_on_the_result_pipe_is_a_failure_not_a_crash_of_pytest(run_inner) -> None:
    """The test holds the pipe's write end; whatever it writes there, P stays safe and says so."""
    result = run_inner(
        """
        import os, pytest
        from helpers import fifos

        @pytest.mark.nsbox
        def test_garbage():
            for fd in fifos():
                os.write(fd, b"\\x00\\x00\\x00\\x05not{json")

        @pytest.mark.nsbox
        def test_huge_frame():
            for fd in fifos():
                os.write(fd, (2**31).to_bytes(4, "big"))

        def test_after():
            pass
        """
    )
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*result stream from the sandbox was corrupt (undecodable record*"])
    result.stdout.fnmatch_lines(["*result stream from the sandbox was corrupt (record of 2147483648 bytes exceeds*"])
