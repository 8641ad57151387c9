"""The memory budget: sandboxes with a memory limit start only while their limits fit, across
xdist workers and concurrent runs; a crashed run's share comes back."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns, pytest.mark.needs_cgroup_limits]

TWO_TESTS = """
    import time
    from pytest_nsbox import nsbox

    def span(name):
        start = time.time()
        time.sleep(1.5)
        print(f"SPAN {name} {start} {time.time()}")

    @nsbox(memory="200M")
    def test_a():
        span("a")

    @nsbox(memory="200M")
    def test_b():
        span("b")
    """


@pytest.fixture(autouse=True)
def own_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ledger of this test's own (other runs on the machine must not change the figures)."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("COLUMNS", "300")
    return runtime / "pytest-nsbox"


def spans(output: str) -> list[tuple[float, float]]:
    found = sorted((float(a), float(b)) for a, b in re.findall(r"SPAN \w (\S+) (\S+)", output))
    assert len(found) == 2, output
    return found


@pytest.mark.parametrize(("budget", "overlap"), [("300M", False), ("500M", True)])
def test_two_200M_tests_under_xdist_overlap_only_when_both_fit(run_inner, budget: str, overlap: bool) -> None:
    result = run_inner(TWO_TESTS, "-n", "2", f"--nsbox-memory-budget={budget}")
    result.assert_outcomes(passed=2)
    (_, first_end), (second_start, _) = spans(result.stdout.str())
    assert (second_start < first_end) is overlap
    waited = re.search(r"nsbox: 1 sandboxed test\(s\) waited for the memory budget: (\S+)s in total", result.stdout.str())
    assert (waited is not None) is not overlap, result.stdout.str()
    header = re.search(r"; memory budget (\d+) MiB \(command line\)", result.stdout.str())
    assert header and int(header[1]) == int(budget[:-1])


def test_a_limit_bigger_than_the_budget_is_an_error(run_inner, pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nnsbox_memory_budget = 100M\n")
    result = run_inner(
        """
        from pytest_nsbox import nsbox

        @nsbox(memory="200M")
        def test_big():
            raise AssertionError("never runs")
        """
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["ERROR test_inner.py::test_big - *memory limit of 200 MiB is bigger than the whole memory budget of 100 MiB (ini)*"]
    )


def test_a_bad_budget_is_a_usage_error(run_inner) -> None:
    result = run_inner("def test_x(): pass", "--nsbox-memory-budget=lots")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid memory budget 'lots' from option --nsbox-memory-budget*"])


def test_without_a_budget_option_the_budget_is_the_available_memory(run_inner) -> None:
    result = run_inner("def test_x(): pass")
    header = re.search(r"; memory budget (\S+ \S+) \(available at the start\)", result.stdout.str())
    assert header, result.stdout.str()
    off = run_inner("def test_x(): pass", "--nsbox-memory-budget=0")
    assert "memory budget" not in off.stdout.str()


def test_the_share_of_a_run_killed_with_sigkill_is_reclaimed(pytester: pytest.Pytester, own_ledger: Path) -> None:
    pytester.makepyfile(
        test_holds="""
        import time
        from pytest_nsbox import nsbox

        @nsbox(memory="200M")
        def test_holds(tmp_path_factory):
            (tmp_path_factory.getbasetemp() / "started").touch()
            time.sleep(600)
        """,
        test_needs="""
        from pytest_nsbox import nsbox

        @nsbox(memory="200M")
        def test_needs():
            pass
        """,
    )
    base = pytester.path / "base"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--nsbox-memory-budget=300M", f"--basetemp={base}"]
    holder = subprocess.Popen(
        [*command, "test_holds.py"],
        cwd=pytester.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            if (base / "started").exists():
                break
            time.sleep(0.1)
        assert (base / "started").exists() and len(list(own_ledger.glob("*.limit"))) == 1
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # our own child: no cleanup runs
        holder.wait()
    assert len(list(own_ledger.glob("*.limit"))) == 1  # its entry is still there
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nsbox-memory-budget=300M", "test_needs.py", timeout=120)
    result.assert_outcomes(passed=1)
    assert "waited for the memory budget" not in result.stdout.str()
    assert not list(own_ledger.glob("*.limit"))
