"""Nothing leaks: mounts, processes, descriptors, scratch directories; a test cannot reach outside."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from helpers import orphaned_scratch_dirs, processes_with

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]

FD_PROBE_CONFTEST = """
import os
from helpers import open_descriptors

def _count(config):
    from pytest_nsbox.plugin import RUNNER_KEY

    config.stash[RUNNER_KEY].supervisor.reap(block=True)  # a sandbox still exiting holds a pidfd until it is reaped
    return open_descriptors()

def pytest_configure(config):
    global CONFIG
    CONFIG = config

def pytest_runtest_logfinish(nodeid, location):
    # In the same steady state (the next item's sandbox and a spare built ahead), after lazy,
    # per-session setup: early in the run, and near its end.
    if nodeid.endswith("test_many[2]"):
        open("fds.before", "w").write(str(_count(CONFIG)))
    if nodeid.endswith("test_many[498]"):
        open("fds.after", "w").write(str(_count(CONFIG)))

def pytest_sessionfinish(session):
    open("pid", "w").write(str(os.getpid()))
"""


@pytest.mark.slow
def test_500_sandboxed_tests_leave_nothing_behind(run_inner, pytester: pytest.Pytester) -> None:
    token = f"nsbox-leak-{uuid.uuid4().hex}"
    mounts_before = Path("/proc/self/mountinfo").read_text()
    result = run_inner(
        f"""
        import subprocess, sys, time, pytest

        @pytest.mark.nsbox
        @pytest.mark.parametrize("n", range(500))
        def test_many(n):
            if n % 100 == 0:     # a daemon left running in its own session
                daemon = subprocess.Popen(
                    [sys.executable, "-c", "import time; time.sleep(300)", {token!r}], start_new_session=True
                )
                time.sleep(0.2)
                assert daemon.poll() is None
        """,
        conftest=FD_PROBE_CONFTEST,
        timeout=600,
    )
    result.assert_outcomes(passed=500)
    assert Path("/proc/self/mountinfo").read_text() == mounts_before
    inner_pid = (pytester.path / "pid").read_text()
    assert [d for d in orphaned_scratch_dirs() if d.startswith(f"pytest-nsbox-{inner_pid}-")] == []
    assert processes_with(token) == []
    assert int((pytester.path / "fds.after").read_text()) == int((pytester.path / "fds.before").read_text())


def test_kill_all_inside_harms_only_the_sandbox(run_inner) -> None:
    survivor = subprocess.Popen(["sleep", "120"])
    try:
        result = run_inner(
            """
            import os, signal, subprocess, pytest

            @pytest.mark.nsbox
            def test_kill_everything():
                child = subprocess.Popen(["sleep", "60"])
                os.kill(-1, signal.SIGKILL)           # every process this test may signal
                assert child.wait() == -signal.SIGKILL

            def test_pytest_survived():
                pass
            """
        )
        result.assert_outcomes(passed=2)
        assert survivor.poll() is None
    finally:
        survivor.send_signal(signal.SIGKILL)
        survivor.wait()


def test_a_forged_end_record_cannot_keep_the_sandbox_alive(run_inner) -> None:
    """A hostile test writes C's "done" record itself and hangs: FAILED, killed by the session's end."""
    token = f"nsbox-forger-{uuid.uuid4().hex}"
    start = time.monotonic()
    result = run_inner(
        f"""
        import os, subprocess, sys, time, pytest
        from helpers import fifos
        from pytest_nsbox.box import wire

        @pytest.mark.nsbox
        def test_forge():
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", {token!r}])
            for fd in fifos():
                os.write(fd, wire.encode({{"kind": "done"}}))
            time.sleep(300)

        def test_after():
            pass
        """
    )
    result.assert_outcomes(passed=1, failed=1)
    assert time.monotonic() - start < 60
    assert processes_with(token) == []


LEAVES_PROCESSES = """
    import os, subprocess, threading, time
    from pytest_nsbox import nsbox

    @nsbox
    def test_leaves_a_daemon():
        subprocess.Popen(["sleep", "1000"], start_new_session=True)

    @nsbox
    def test_threads_and_zombies_are_not_leftovers():
        threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
        if os.fork() == 0:
            os._exit(0)  # a child that ended; the test never waits for it
        time.sleep(0.2)

    @nsbox
    def test_clean():
        subprocess.run(["true"], check=True)
    """


@pytest.mark.both_build_modes
def test_processes_left_running_are_listed_and_warned_about(run_inner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    result = run_inner(LEAVES_PROCESSES)
    result.assert_outcomes(passed=3, warnings=1)
    text = result.stdout.str()
    warning = r"test_leaves_a_daemon: nsbox: the test left 1 process\(es\) running, killed when it ended \(pid \d+: sleep 1000\)"
    assert re.search(warning, text), text
    section = text[text.index("nsbox: processes left running") :]
    assert re.match(r"nsbox: processes left running -*\npid \d+: sleep 1000\n", section), section[:200]
    assert text.count("nsbox: processes left running") == 1  # the other two left nothing running


@pytest.mark.both_build_modes
def test_nsbox_leaks_fail_fails_the_test(run_inner, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    result = run_inner(LEAVES_PROCESSES, "--nsbox-leaks=fail")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_leaves_a_daemon - *nsbox: the test left 1 process(es) running*"])
    pytester.makeini("[pytest]\nnsbox_leaks = fail\n")
    run_inner(LEAVES_PROCESSES).assert_outcomes(passed=2, failed=1)
    pytester.makeini("[pytest]\nnsbox_leaks = sometimes\n")
    bad = run_inner(LEAVES_PROCESSES)
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*invalid ini nsbox_leaks 'sometimes' (expected warn or fail)*"])


@pytest.mark.parametrize(
    "forged",
    [
        'kind="leftovers", processes=5',
        'kind="leftovers", processes=[[1.5, "x"], "ab", [True, "y"]]',
        'kind="disk_usage", free=float("inf"), free_inodes=True',
        'kind="disk_usage", free="lots"',
    ],
)
def test_forged_records_cannot_end_the_session(run_inner, forged: str) -> None:
    result = run_inner(
        f"""
        import pytest
        from pytest_nsbox.runtest import child_channel

        @pytest.mark.nsbox
        def test_forge(request):
            child_channel(request.config).send({forged})

        @pytest.mark.nsbox
        def test_after():
            pass
        """
    )
    result.assert_outcomes(passed=2)  # a record that cannot be read is ignored; the session goes on
