"""Sandboxes built ahead of time: one builder per pytest process, nothing of it outlives the session."""

from __future__ import annotations

import pytest
from helpers import PID_FILE_CONFTEST, builders_of, cgroups_of

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]


def test_one_builder_per_session_and_none_after_it(run_inner, pytester: pytest.Pytester) -> None:
    result = run_inner(
        """
        import pytest
        from helpers import child_builders
        from pytest_nsbox import require_sandbox

        @pytest.mark.nsbox
        @pytest.mark.parametrize("n", range(5))
        def test_sandboxed(n):
            require_sandbox()

        def test_one_builder():
            assert len(child_builders()) == 1
        """,
        conftest=PID_FILE_CONFTEST,
    )
    result.assert_outcomes(passed=6)
    pid = (pytester.path / "pid").read_text()
    assert builders_of(pid) == []
    assert cgroups_of(pid) == []


def test_sandbox_built_for_a_test_that_never_runs_is_removed(run_inner, pytester: pytest.Pytester) -> None:
    """-x stops after the first failure: the sandbox prebuilt for the next test is killed, its cgroup removed."""
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox(memory="64M")
        def test_fails():
            assert False

        @pytest.mark.nsbox(memory="64M")
        def test_never_runs():
            pass
        """,
        "-x",
        conftest=PID_FILE_CONFTEST,
    )
    result.assert_outcomes(failed=1)
    pid = (pytester.path / "pid").read_text()
    assert builders_of(pid) == []
    assert cgroups_of(pid) == []


def test_prebuilt_sandbox_is_dropped_when_the_next_item_changes(run_inner) -> None:
    """An unmarked test between two marked ones: the order pytest runs them in decides, not a guess."""
    result = run_inner(
        """
        import pytest
        from pytest_nsbox import require_sandbox

        @pytest.mark.nsbox(network="host")
        def test_a():
            require_sandbox()

        def test_unmarked():
            import socket
            assert socket.gethostname() != "nsbox"

        @pytest.mark.nsbox
        def test_b():
            require_sandbox()
        """,
        "-p",
        "no:randomly",
    )
    result.assert_outcomes(passed=3)


def test_losing_the_builder_falls_back_to_forked_builds(run_inner) -> None:
    result = run_inner(
        """
        import os, signal, time
        import pytest
        from helpers import child_builders
        from pytest_nsbox import require_sandbox

        @pytest.mark.nsbox
        def test_first():
            require_sandbox()

        def test_kill_the_builder():
            (builder,) = child_builders()
            os.kill(builder, signal.SIGKILL)
            time.sleep(0.2)

        @pytest.mark.nsbox
        @pytest.mark.parametrize("n", range(3))
        def test_still_sandboxed(n):
            require_sandbox()
        """,
        "-p",
        "no:randomly",
    )
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["*NsboxWarning: nsbox: the sandbox builder*built when each test starts from now on*"])


def test_forked_builds_start_no_builder(run_inner) -> None:
    result = run_inner(
        """
        import pytest
        from helpers import child_builders
        from pytest_nsbox import require_sandbox

        @pytest.mark.nsbox
        def test_sandboxed():
            require_sandbox()

        def test_no_builder():
            assert child_builders() == []
        """,
        "-o",
        "nsbox_prebuild=false",
    )
    result.assert_outcomes(passed=2)
