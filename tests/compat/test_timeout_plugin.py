"""pytest-timeout with a sandboxed test: its timer runs in the test process, never in pytest's
(where its SIGALRM interrupted the wait for the sandbox: INTERNALERROR, no tests ran)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]

MESSAGE = "*Timeout (>2.0s) from pytest-timeout.*"
HANGS = """
import time, pytest

@pytest.mark.nsbox
def test_hangs():
    time.sleep(60)

@pytest.mark.nsbox
def test_after():
    pass
"""
def test_signal_method_fails_the_test_with_its_message_and_stack(run_inner) -> None:
    result = run_inner(HANGS, "-p", "no:randomly", "--timeout=2", "--timeout-method=signal")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([">*time.sleep(60)", "E*Failed: Timeout (>2.0s) from pytest-timeout."])
    result.stdout.fnmatch_lines([f"FAILED *test_hangs*{MESSAGE}"])
    assert "INTERNALERROR" not in result.stdout.str()


def test_thread_method_fails_the_test_and_the_run_goes_on(run_inner) -> None:
    """Without sandboxing the thread method ends the whole run (os._exit); here only the test process."""
    result = run_inner(HANGS, "-p", "no:randomly", "--timeout=2", "--timeout-method=thread")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([f"FAILED *test_hangs*{MESSAGE}"])
    result.stdout.fnmatch_lines(["*pytest-timeout: stacks at timeout*", "*in test_hangs*", "*time.sleep(60)*"])


@pytest.mark.parametrize("method", ["signal", "thread"])
def test_marker_with_func_only(run_inner, method: str) -> None:
    result = run_inner(
        f"""
        import time, pytest

        @pytest.fixture
        def slow_fixture():
            time.sleep(3)  # not timed: func_only

        @pytest.mark.nsbox
        @pytest.mark.timeout(2, method="{method}")
        def test_hangs(slow_fixture):
            time.sleep(60)

        @pytest.mark.nsbox
        @pytest.mark.timeout(2, method="{method}")
        def test_slow_fixture_fast_test(slow_fixture):
            pass
        """,
        "-p",
        "no:randomly",
        "-o",
        "timeout_func_only=true",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([f"FAILED *test_hangs*{MESSAGE}"])
