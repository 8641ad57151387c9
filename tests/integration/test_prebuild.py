"""Sandboxes built ahead of time: one builder per pytest process, nothing of it outlives the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]

BUILDER_TOKEN = "pytest_nsbox.box.builder import serve"

# In the inner pytest (P, unsandboxed): the builder processes whose parent is P.
INNER_HELPERS = f"""
import os
from pathlib import Path

TOKEN = {BUILDER_TOKEN.encode()!r}

def builders():
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{{entry}}/stat").read_text()
            cmdline = Path(f"/proc/{{entry}}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and TOKEN in cmdline:
            found.append(int(entry))
    return found

def pytest_sessionfinish(session):
    Path("pid").write_text(str(os.getpid()))
"""


def _builders_of(pid: str) -> list[int]:
    """Builder processes started by the (finished) pytest process *pid*: argv ends with its pid."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(BUILDER_TOKEN.encode() in a for a in argv) and argv[-2:-1] == [pid.encode()]:
                found.append(int(entry))
    return found


def _cgroups_of(pid: str) -> list[str]:
    """Sandbox cgroups (nsbox-<pid>-<n>) of pytest process *pid*, anywhere under /sys/fs/cgroup."""
    found = []
    for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup"):
        found += [f"{dirpath}/{d}" for d in dirnames if d.startswith(f"nsbox-{pid}-")]
    return found


def test_one_builder_per_session_and_none_after_it(run_inner, pytester: pytest.Pytester) -> None:
    result = run_inner(
        """
        import pytest
        from conftest import builders
        from pytest_nsbox import require_sandbox

        @pytest.mark.nsbox
        @pytest.mark.parametrize("n", range(5))
        def test_sandboxed(n):
            require_sandbox()

        def test_one_builder():
            assert len(builders()) == 1
        """,
        conftest=INNER_HELPERS,
    )
    result.assert_outcomes(passed=6)
    pid = (pytester.path / "pid").read_text()
    assert _builders_of(pid) == []
    assert _cgroups_of(pid) == []


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
        conftest=INNER_HELPERS,
    )
    result.assert_outcomes(failed=1)
    pid = (pytester.path / "pid").read_text()
    assert _builders_of(pid) == []
    assert _cgroups_of(pid) == []


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
        from conftest import builders
        from pytest_nsbox import require_sandbox

        @pytest.mark.nsbox
        def test_first():
            require_sandbox()

        def test_kill_the_builder():
            (builder,) = builders()
            os.kill(builder, signal.SIGKILL)
            time.sleep(0.2)

        @pytest.mark.nsbox
        @pytest.mark.parametrize("n", range(3))
        def test_still_sandboxed(n):
            require_sandbox()
        """,
        "-p",
        "no:randomly",
        conftest=INNER_HELPERS,
    )
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["*NsboxWarning: nsbox: the sandbox builder*built when each test starts from now on*"])


def test_forked_builds_start_no_builder(run_inner) -> None:
    result = run_inner(
        """
        import pytest
        from conftest import builders
        from pytest_nsbox import require_sandbox

        @pytest.mark.nsbox
        def test_sandboxed():
            require_sandbox()

        def test_no_builder():
            assert builders() == []
        """,
        "-o",
        "nsbox_prebuild=false",
        conftest=INNER_HELPERS,
    )
    result.assert_outcomes(passed=2)
