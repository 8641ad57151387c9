"""Resource limits on a real kernel: memory (OOM), pids (fork bomb), cpus, timeout, peak report.

Wide margins (STYLE): 64M limit, 16M vs 1G allocations.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import junit_cases, phase_durations, sandbox_cgroups

from pytest_nsbox import reports

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns, pytest.mark.needs_cgroup_limits]

MEMORY_LINE = "*nsbox: test exceeded its memory limit of 64 MiB (peak *, * OOM-killed)*"


def test_memory_limit_oom_is_a_clear_failure_and_the_run_goes_on(run_inner, pytester: pytest.Pytester) -> None:
    result = run_inner(
        """
        import subprocess, sys, pytest

        @pytest.mark.nsbox(memory="64M")
        def test_fits():
            data = bytearray(16 * 2**20)

        @pytest.mark.nsbox(memory="64M")
        def test_allocates_1g():
            data = bytearray(2**30)

        @pytest.mark.nsbox(memory="64M")
        def test_grandchild_allocates_1g():
            code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'bytearray(2**30)'])"
            subprocess.run([sys.executable, "-c", code])

        @pytest.mark.nsbox(memory="64M")
        def test_fills_dev_shm():
            with open("/dev/shm/fill", "wb") as f:
                for _ in range(512):
                    f.write(b"x" * 2**20)

        def test_next_one_runs():
            pass
        """,
        "--junitxml=junit.xml",
    )
    result.assert_outcomes(passed=2, failed=3)
    for name in ("test_allocates_1g", "test_grandchild_allocates_1g", "test_fills_dev_shm"):
        result.stdout.fnmatch_lines([f"*_ {name} _*", MEMORY_LINE])
    xml = (pytester.path / "junit.xml").read_text()
    assert 'name="nsbox_memory_peak"' in xml and f'name="nsbox_memory_limit" value="{64 * 2**20}"' in xml


def test_peak_memory_summary(run_inner) -> None:
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox(memory="256M")
        def test_big():
            data = bytearray(100 * 2**20)
            for i in range(0, len(data), 4096):
                data[i] = 1

        @pytest.mark.nsbox
        def test_small():
            pass
        """,
        "--nsbox-memory-report=5",
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*nsbox: peak memory of sandboxed tests*", "*peak*limit*margin*test", "*MiB*256 MiB*test_inner.py::test_big"]
    )


def test_fork_bomb_hits_the_pids_limit(run_inner) -> None:
    result = run_inner(
        """
        import os, subprocess, pytest

        @pytest.mark.nsbox(pids=32)
        def test_fork_bomb():
            children = []
            try:
                while True:
                    children.append(subprocess.Popen(["sleep", "60"]))
            except OSError:
                pass

        def test_host_still_fine():
            pass
        """
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*pids limit 32 reached*"])


def test_limit_cause_leads_the_summary_line_and_junit_even_when_the_test_failed_by_itself(
    run_inner, pytester: pytest.Pytester
) -> None:
    """The test fails on its own (fork refused, a child OOM-killed); the limit still comes first."""
    result = run_inner(
        """
        import subprocess, sys, pytest

        @pytest.mark.nsbox(pids=20)
        def test_fork_bomb():
            children = []
            while True:
                children.append(subprocess.Popen(["sleep", "60"]))

        @pytest.mark.nsbox(memory="64M")
        def test_child_oom():
            subprocess.run([sys.executable, "-c", "bytearray(2**30)"], check=True)
        """,
        "--junitxml=junit.xml",
    )
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*BlockingIOError*", "*nsbox: limit*", "*pids limit 20 reached*"])  # traceback kept
    result.stdout.fnmatch_lines(
        [
            "FAILED test_inner.py::test_fork_bomb - nsbox: pids limit 20 reached*",
            # cgroup v2 (memory.oom.group) kills the test process too: then P fails it ("Failed: nsbox: ...")
            "FAILED test_inner.py::test_child_oom - *nsbox: test exceeded its memor*",  # 80 columns
        ]
    )
    cases = junit_cases(pytester.path / "junit.xml")
    bomb, oom = cases["test_fork_bomb"], cases["test_child_oom"]
    assert str(bomb.message).startswith("nsbox: pids limit 20 reached") and "BlockingIOError" in str(bomb.message)
    first_line = str(oom.message).splitlines()[0]
    assert "nsbox: test exceeded its memory limit of 64 MiB" in first_line, oom.message
    if "CalledProcessError" in str(oom.message):  # v1: only the child was killed, and the test failed by itself
        assert first_line.startswith("nsbox: test exceeded its memory limit"), oom.message
    # (v2, memory.oom.group: the test process is killed too, and P fails it with the cause alone)
    assert bomb.properties["nsbox_pids_limit"] == "20" and bomb.properties[reports.CAUSE_PROPERTY] == "pids"
    assert oom.properties["nsbox_memory_limit"] == str(64 * 2**20) and oom.properties[reports.CAUSE_PROPERTY] == "memory"


EXPECTED_MEMORY_LINE = "*nsbox: test exceeded its memory limit of 128 MiB (peak *, * OOM-killed), as the marker expects*"


@pytest.mark.both_build_modes
def test_an_expected_oom_kill_of_a_child_leaves_the_test_to_its_own_outcome(
    run_inner, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """expect_limits="memory": a child OOM-killed is what the test checks; the test process itself
    OOM-killed still fails it (cgroup v2: memory.oom.group stays off, so only the child dies)."""
    monkeypatch.setenv("COLUMNS", "200")  # whole short summary lines
    result = run_inner(
        """
        import subprocess, sys, pytest
        from pytest_nsbox import nsbox

        def run_greedy_child():
            return subprocess.run([sys.executable, "-c", "bytearray(2**30)"]).returncode

        @nsbox(memory="128M", expect_limits="memory")
        def test_child_oom_expected():
            assert run_greedy_child() == -9
            print("the test process goes on")

        @pytest.mark.nsbox(memory="128M", expect_limits=("memory",))
        def test_child_oom_expected_but_the_test_fails():
            assert run_greedy_child() == 0

        @pytest.mark.nsbox(memory="128M")
        def test_child_oom_not_expected():
            run_greedy_child()

        @pytest.mark.nsbox(memory="128M", expect_limits="memory")
        def test_itself_oom_killed():
            data = bytearray(2**30)
        """,
        "--junitxml=junit.xml",
    )
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines(["*_ test_child_oom_expected _*", "*- nsbox: limit -*", EXPECTED_MEMORY_LINE])
    result.stdout.fnmatch_lines(["*the test process goes on*"])
    result.stdout.fnmatch_lines(
        [
            "FAILED test_inner.py::test_child_oom_expected_but_the_test_fails - nsbox: test exceeded its memory limit "
            "of 128 MiB (peak *, 1 process OOM-killed), as the marker expects (expect_limits)",
            "FAILED test_inner.py::test_child_oom_not_expected - *nsbox: test exceeded its memory limit of 128 MiB*",
            "FAILED test_inner.py::test_itself_oom_killed - *nsbox: test exceeded its memory limit of 128 MiB (*): "
            "the test process itself was killed*",
        ]
    )
    cases = junit_cases(pytester.path / "junit.xml")
    passed, failing = cases["test_child_oom_expected"], cases["test_child_oom_expected_but_the_test_fails"]
    assert passed.message is None
    assert passed.properties[reports.EXPECTED_PROPERTY] == "memory" and reports.CAUSE_PROPERTY not in passed.properties
    assert str(failing.message).startswith("nsbox: test exceeded its memory limit of 128 MiB"), failing.message
    assert "as the marker expects" in str(failing.message) and "assert -9 == 0" in str(failing.message)
    assert failing.properties[reports.CAUSE_PROPERTY] == "memory"
    assert cases["test_child_oom_not_expected"].properties[reports.CAUSE_PROPERTY] == "memory"
    itself = cases["test_itself_oom_killed"]
    assert "the test process itself was killed" in str(itself.message), itself.message
    assert itself.properties[reports.CAUSE_PROPERTY] == "memory" and reports.EXPECTED_PROPERTY not in itself.properties


@pytest.mark.both_build_modes
def test_forks_refused_at_an_expected_pids_limit_leave_the_test_to_its_own_outcome(
    run_inner, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """expect_limits="pids": a fork bomb that the test (or its child) catches passes; without the
    expectation the same test fails with the pids limit; a test that does not catch it fails,
    the pids limit first."""
    monkeypatch.setenv("COLUMNS", "200")  # whole short summary lines
    result = run_inner(
        """
        import subprocess, sys, pytest

        BOMB = "\\n".join(
            [
                "import os, signal, time",
                "children = []",
                "try:",
                "    while True:",
                "        pid = os.fork()",
                "        if pid == 0:",
                "            time.sleep(600)",
                "            os._exit(0)",
                "        children.append(pid)",
                "except BlockingIOError:",
                "    print('refused after', len(children))",
                "for pid in children:",
                "    os.kill(pid, signal.SIGKILL)",
                "    os.waitpid(pid, 0)",
            ]
        )

        def sleepers_until_refused():
            children = []
            try:
                with pytest.raises(BlockingIOError):
                    while True:
                        children.append(subprocess.Popen(["sleep", "600"]))
            finally:
                for child in children:
                    child.kill()
                    child.wait()
            return len(children)

        @pytest.mark.nsbox(pids=32, expect_limits="pids")
        def test_bomb_child_expected():
            out = subprocess.run([sys.executable, "-c", BOMB], capture_output=True, text=True, check=True).stdout
            assert out.startswith("refused after")

        @pytest.mark.nsbox(pids=32, expect_limits=["pids"])
        def test_test_catches_refused_fork():
            assert 0 < sleepers_until_refused() < 32

        @pytest.mark.nsbox(pids=32)
        def test_not_expected():
            assert 0 < sleepers_until_refused() < 32

        @pytest.mark.nsbox(pids=32, expect_limits="pids")
        def test_does_not_catch():
            children = []
            while True:
                children.append(subprocess.Popen(["sleep", "600"]))
        """,
        "--junitxml=junit.xml",
    )
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        ["*_ test_bomb_child_expected _*", "*- nsbox: limit -*", "*pids limit 32 reached*as the marker expects*"]
    )
    result.stdout.fnmatch_lines(
        [
            "FAILED test_inner.py::test_not_expected - *nsbox: pids limit 32 reached (* fork(s) refused)",
            "FAILED test_inner.py::test_does_not_catch - nsbox: pids limit 32 reached (* fork(s) refused), as the*",
        ]
    )
    cases = junit_cases(pytester.path / "junit.xml")
    for name in ("test_bomb_child_expected", "test_test_catches_refused_fork"):
        properties = cases[name].properties
        assert cases[name].message is None
        assert properties[reports.EXPECTED_PROPERTY] == "pids" and reports.CAUSE_PROPERTY not in properties
    uncaught = cases["test_does_not_catch"]
    assert "BlockingIOError" in str(uncaught.message) and uncaught.properties[reports.CAUSE_PROPERTY] == "pids"
    assert reports.EXPECTED_PROPERTY not in cases["test_not_expected"].properties


def test_killed_tests_report_the_time_they_ran(run_inner, pytester: pytest.Pytester) -> None:
    """Timed out and OOM-killed: the call lasted at least what the test spent before (lower bounds
    only, well below: the timeout counts from the fork, the call from the end of the setup)."""
    result = run_inner(
        """
        import time, pytest

        @pytest.mark.nsbox(timeout=2, cpus=1)
        def test_hangs():
            time.sleep(600)

        @pytest.mark.nsbox(memory="64M")
        def test_oom_after_a_second():
            time.sleep(1)
            data = bytearray(2**30)
        """,
        "--junitxml=junit.xml",
        "--durations=0",
    )
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_hangs - *timed out after 2.0s*"])
    cases = junit_cases(pytester.path / "junit.xml")
    calls = phase_durations(result.stdout.str(), "call")
    assert cases["test_hangs"].time >= 1.0 and calls["test_hangs"] >= 1.0, (cases, calls)
    assert cases["test_oom_after_a_second"].time >= 1.0 and calls["test_oom_after_a_second"] >= 1.0, (cases, calls)
    hangs = cases["test_hangs"].properties
    assert hangs["nsbox_timeout_limit"] == "2.0" and hangs["nsbox_cpus_limit"] == "1.0"
    assert hangs[reports.CAUSE_PROPERTY] == "timeout"
    assert str(cases["test_hangs"].message).startswith("Failed: nsbox: test timed out after 2.0s")
    assert cases["test_oom_after_a_second"].properties[reports.CAUSE_PROPERTY] == "memory"


def test_cpu_bandwidth(run_inner) -> None:
    result = run_inner(
        """
        import time, pytest

        @pytest.mark.nsbox(cpus=0.25)
        def test_spin():
            wall, cpu = time.monotonic(), time.process_time()
            while time.monotonic() - wall < 2:
                pass
            share = (time.process_time() - cpu) / (time.monotonic() - wall)
            print(f"share {share:.2f}")
            assert 0.1 < share < 0.4
        """
    )
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("body", "frame"),
    [
        ("time.sleep(600)", "time.sleep(600)"),
        ("while True: pass", "while True"),
        ("signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)", "time.sleep(600)"),
        ("subprocess.run(['sleep', '600'], start_new_session=True)", "subprocess"),
        ("os.read(os.pipe()[0], 1)", "os.read"),
    ],
)
def test_timeout_ends_the_test_on_time_with_its_stack(run_inner, body: str, frame: str) -> None:
    start = time.monotonic()
    result = run_inner(
        f"""
        import os, signal, subprocess, time, pytest

        @pytest.mark.nsbox(timeout=2)
        def test_hangs():
            {body}

        def test_next():
            pass
        """
    )
    assert time.monotonic() - start < 30
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*nsbox: test timed out after 2.0s*", "*nsbox: stack at timeout*", "*test_inner.py*in test_hangs"]
    )


def test_timeout_covers_setup_and_teardown(run_inner) -> None:
    result = run_inner(
        """
        import time, pytest

        @pytest.fixture
        def slow_teardown():
            yield
            time.sleep(600)

        @pytest.mark.nsbox(timeout=2)
        def test_teardown_hangs(slow_teardown):
            pass
        """
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_teardown_hangs*", "*timed out after 2.0s*"])


def test_ini_defaults_and_marker_override(run_inner, pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nnsbox_memory = 64M\nnsbox_timeout = 30\n")
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox
        def test_default_limit():
            data = bytearray(2**30)

        @pytest.mark.nsbox(memory="2G")
        def test_override():
            data = bytearray(256 * 2**20)
        """
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([MEMORY_LINE])


@pytest.fixture
def private_cgroup_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """On cgroup v1, a cgroup root of this test's own below the usual one: any other pytest that
    starts (another xdist worker's inner run) sweeps the usual root. v2 runs in UML, alone."""
    from pytest_nsbox.box import cgroups

    base = os.environ.get("PYTEST_NSBOX_CGROUP_ROOT", "")
    manager = cgroups.detect(base)
    assert manager is not None
    if not isinstance(manager, cgroups.ManagerV1):
        yield base
        return
    private = f"{manager.root_name}/sweep-{uuid.uuid4().hex[:12]}"
    made = [cgroups.CGROUP_MOUNT / ctrl / private for ctrl in cgroups.V1_CONTROLLERS]
    for path in made:
        path.mkdir(parents=True)
    monkeypatch.setenv("PYTEST_NSBOX_CGROUP_ROOT", private)
    yield private
    for path in made:
        for child in path.iterdir() if path.is_dir() else []:
            if child.is_dir():
                child.rmdir()
        path.rmdir()


def test_pytest_killed_mid_test_leaves_cgroups_that_the_next_run_sweeps(
    pytester: pytest.Pytester, private_cgroup_root: str
) -> None:
    pytester.makepyfile(
        test_hang="""
        import time, pytest

        @pytest.mark.nsbox(memory="64M")
        def test_hang():
            time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_hang.py"], cwd=pytester.path)

    def leftover() -> set[Path]:  # only this pytest's cgroups
        return {p for p in sandbox_cgroups(private_cgroup_root) if p.name.startswith(f"nsbox-{proc.pid}-")}

    try:
        deadline = time.monotonic() + 30
        while not leftover() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert leftover(), "the sandbox's cgroup never appeared"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(0.5)  # the sandbox dies with pytest (PDEATHSIG); its empty cgroup stays
    left = leftover()
    assert left
    pytester.makepyfile(test_ok="import pytest\n\n@pytest.mark.nsbox(memory='64M')\ndef test_ok(): pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "test_ok.py")
    result.assert_outcomes(passed=1)
    assert not (sandbox_cgroups(private_cgroup_root) & left)


def test_limits_under_xdist_use_one_cgroup_per_sandbox(run_inner) -> None:
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox(memory="64M", pids=64)
        @pytest.mark.parametrize("n", range(8))
        def test_small(n):
            data = bytearray(8 * 2**20)

        @pytest.mark.nsbox(memory="64M")
        @pytest.mark.parametrize("n", range(2))
        def test_oom(n):
            data = bytearray(2**30)
        """,
        "-n",
        "2",
    )
    result.assert_outcomes(passed=8, failed=2)
    result.stdout.fnmatch_lines([MEMORY_LINE])
