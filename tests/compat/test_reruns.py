"""pytest-rerunfailures: each rerun in a fresh sandbox, reported exactly as without sandboxing.

Each scenario runs twice, plain and with ``--nsbox-all``, and the two runs must tell the same story:
the progress line (``R`` per rerun), the summary (``N rerun``), ``-rR``'s rerun summary and junit.
Attempts count themselves in a file under pytest's basetemp (shared with the host: it outlives a
sandbox, like a flaky resource would).
"""

from __future__ import annotations

import re
from xml.etree import ElementTree

import pytest

from pytest_nsbox import reports

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]

ATTEMPTS = """
import os, pathlib, time, pytest

def attempt(request):
    '''This test's attempt number (0, 1, ...), counted under basetemp (it survives the sandbox).'''
    counter = request.getfixturevalue("tmp_path_factory").getbasetemp() / (request.node.name + ".attempts")
    n = len(counter.read_text()) if counter.exists() else 0
    with counter.open("a") as f:
        f.write("x")
    return n
"""

SUMMARY = re.compile(r"^=+ (.*\d.*) in [\d.]+s", re.M)
PROGRESS = re.compile(r"^test_inner\.py (\S+)", re.M)


@pytest.fixture
def run_inner(run_inner):
    """The inner runs keep pytest's order (pytest-randomly is installed here: -p no:randomly)."""

    def run(source: str, *args: str) -> pytest.RunResult:
        return run_inner(source, "-p", "no:randomly", *args)

    return run


def assert_counts(result: pytest.RunResult, **expected: int) -> None:
    """The summary line's counts, reruns included (assert_outcomes does not know them)."""
    outcomes = result.parseoutcomes()
    outcomes.pop("warnings", None)
    outcomes.pop("warning", None)
    assert outcomes == expected, result.stdout.str()[-3000:]


def story(result: pytest.RunResult) -> tuple[str, str, list[str]]:
    """(summary counts, progress characters, -rR rerun summary lines) of one run."""
    text = result.stdout.str()
    summary = SUMMARY.findall(text)[-1]
    progress = "".join(PROGRESS.findall(text)[:1])
    lines = text.splitlines()
    rerun_section = []
    if any("rerun test summary info" in line for line in lines):
        start = next(i for i, line in enumerate(lines) if "rerun test summary info" in line) + 1
        for line in lines[start:]:
            if line.startswith("="):
                break
            rerun_section.append(line)
    return summary, progress, rerun_section


def junit_cases(pytester: pytest.Pytester, name: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """junit's testcases: name, and each result element with its message (times and properties left out)."""
    suite = ElementTree.parse(pytester.path / name).getroot()
    cases = [
        (case.get("classname", ""), case.get("name", ""), [(e.tag, e.get("message", "")) for e in case if e.tag != "properties"])
        for case in suite.iter("testcase")
    ]
    return sorted(cases)


def run_both(
    run_inner, pytester: pytest.Pytester, source: str, *args: str, ordered: bool = True
) -> tuple[pytest.RunResult, pytest.RunResult]:
    """The same tests plain and with --nsbox-all: the same story, the same junit testcases."""
    plain = run_inner(source, "-rR", "--junitxml=plain.xml", *args)
    sandboxed = run_inner(source, "-rR", "--junitxml=sandboxed.xml", "--nsbox-all", *args)
    assert "INTERNALERROR" not in sandboxed.stdout.str() + sandboxed.stderr.str()
    if ordered:
        assert story(sandboxed) == story(plain)
    else:  # under xdist: the same counts, the same lines in any order
        assert story(sandboxed)[0] == story(plain)[0]
        assert sorted(story(sandboxed)[2]) == sorted(story(plain)[2])
    assert junit_cases(pytester, "sandboxed.xml") == junit_cases(pytester, "plain.xml")
    return plain, sandboxed


def test_installed_only_own_outcomes_are_failures(run_inner) -> None:
    """Installed but not asked to rerun: a timeout, a crash and an early exit are plain failures."""
    result = run_inner(
        """
        import os, time, pytest

        @pytest.mark.nsbox(timeout=1)
        def test_timeout():
            time.sleep(60)

        @pytest.mark.nsbox
        def test_crash():
            os.abort()

        @pytest.mark.nsbox
        def test_early_exit():
            os._exit(0)

        @pytest.mark.nsbox
        def test_ok():
            pass
        """
    )
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines_random(
        ["*timed out after 1.0s*", "*crashed with signal SIGABRT*", "*exited with status 0 during call*"]
    )


@pytest.mark.needs_cgroup_limits
def test_installed_only_limit_outcome_is_a_failure(run_inner) -> None:
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox(memory="64M")
        def test_oom():
            hog = bytearray(512 * 2**20)
        """
    )
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*memory limit*"])


def test_reruns_reported_as_without_sandbox(run_inner, pytester: pytest.Pytester) -> None:
    _, sandboxed = run_both(
        run_inner,
        pytester,
        ATTEMPTS
        + """
def test_fails_once(request):
    assert attempt(request) >= 1

def test_always_fails(request):
    attempt(request)
    assert False

def test_passes(request):
    attempt(request)

def test_setup_fails_once(request, broken_once):
    pass

@pytest.fixture
def broken_once(request):
    assert attempt(request) >= 1

@pytest.mark.xfail
def test_xfail_not_rerun(request):
    attempt(request)
    assert False
""",
        "--reruns",
        "2",
    )
    assert_counts(sandboxed, passed=3, failed=1, xfailed=1, rerun=4)
    assert story(sandboxed)[1] == "R.RRF.R.x"
    sandboxed.stdout.fnmatch_lines(
        ["*rerun test summary info*", "RERUN test_inner.py::test_fails_once", "PASSED test_inner.py::test_fails_once"]
    )


def test_each_rerun_in_a_fresh_sandbox(run_inner) -> None:
    """What an attempt leaves in the sandbox's filesystem is gone for the next."""
    result = run_inner(
        ATTEMPTS
        + """
@pytest.mark.nsbox
def test_leaves_a_file(request):
    leftover = pathlib.Path("/leftover")
    assert not leftover.exists(), "the rerun inherited the first attempt's filesystem"
    leftover.write_text("first attempt")
    assert attempt(request) >= 1
""",
        "--reruns",
        "1",
    )
    assert_counts(result, passed=1, rerun=1)


def test_wider_fixtures_stay_up_across_reruns(run_inner, pytester: pytest.Pytester) -> None:
    """A module fixture is set up once and torn down once, whatever the reruns (as rerunfailures does)."""
    log = pytester.path / "resource.log"  # written by P (the fixture's scope is wider): on the host
    source = (
        ATTEMPTS
        + f"""
LOG = pathlib.Path({str(log)!r})

@pytest.fixture(scope="module")
def resource():
    with LOG.open("a") as f:
        f.write("up ")
    yield
    with LOG.open("a") as f:
        f.write("down ")

def test_fails_twice(request, resource):
    assert attempt(request) >= 2

def test_after(resource):
    assert LOG.read_text() == "up "
"""
    )
    for mode in ((), ("--nsbox-all",)):
        result = run_inner(source, "--reruns", "3", *mode)
        assert_counts(result, passed=2, rerun=2)
        assert log.read_text() == "up down "
        log.unlink()


def test_nsbox_outcomes_rerun_like_failures(run_inner, pytester: pytest.Pytester) -> None:
    """A timeout, a crash and an early exit are failures rerunfailures reruns (also --only-rerun on their words)."""
    result = run_inner(
        ATTEMPTS
        + """
@pytest.mark.nsbox(timeout=2)
def test_times_out_once(request):
    if attempt(request) == 0:
        time.sleep(60)

@pytest.mark.nsbox
def test_crashes_once(request):
    if attempt(request) == 0:
        os.abort()

@pytest.mark.nsbox
def test_exits_once(request):
    if attempt(request) == 0:
        os._exit(3)

@pytest.mark.nsbox(timeout=1)
def test_always_times_out(request):
    attempt(request)
    time.sleep(60)
""",
        "--reruns",
        "2",
        "-rA",
    )
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert_counts(result, passed=3, failed=1, rerun=5)
    result.stdout.fnmatch_lines(["test_inner.py R.R.R.RRF*", "FAILED *test_always_times_out*"])
    assert TIMED_OUT_WORDS in result.stdout.str()


TIMED_OUT_WORDS = reports.TIMED_OUT.split("{")[0]


def test_only_rerun_and_marker(run_inner, pytester: pytest.Pytester) -> None:
    """--only-rerun matches the exception raised in the sandbox, and P's own outcomes by their words;
    @pytest.mark.flaky(reruns=N) overrides --reruns."""
    source = (
        ATTEMPTS
        + """
def test_value_error_reruns(request):
    if attempt(request) == 0:
        raise ValueError("flaky value")

def test_assertion_not_rerun(request):
    attempt(request)
    assert False

@pytest.mark.flaky(reruns=3)
def test_marker_three(request):
    if attempt(request) < 3:
        raise ValueError("again")

@pytest.mark.flaky(reruns=3, only_rerun=["ZeroDivision"])
def test_marker_only_rerun(request):
    if attempt(request) < 1:
        1 / 0
"""
    )
    _, sandboxed = run_both(run_inner, pytester, source, "--reruns", "1", "--only-rerun", "ValueError")
    assert_counts(sandboxed, passed=3, failed=1, rerun=5)

    timeout = run_inner(
        ATTEMPTS
        + """
@pytest.mark.nsbox(timeout=1)
def test_times_out_once(request):
    if attempt(request) == 0:
        time.sleep(60)

@pytest.mark.nsbox
def test_crash_not_rerun(request):
    attempt(request)
    os.abort()
""",
        "--reruns",
        "2",
        "--only-rerun",
        "timed out after",
    )
    assert_counts(timeout, passed=1, failed=1, rerun=1)


def test_reruns_delay(run_inner) -> None:
    """--reruns-delay waits between attempts (a lower bound only: never flaky under load)."""
    result = run_inner(
        """
import time, pytest

def test_stamps(tmp_path_factory):
    stamps = tmp_path_factory.getbasetemp() / "stamps"
    with stamps.open("a") as f:
        f.write(f"{time.time()}\\n")
    times = [float(t) for t in stamps.read_text().split()]
    assert len(times) == 3
    assert all(b - a >= 1.0 for a, b in zip(times, times[1:])), times
""",
        "--nsbox-all",
        "--reruns",
        "2",
        "--reruns-delay",
        "1",
    )
    assert_counts(result, passed=1, rerun=2)


def test_reruns_under_xdist(run_inner, pytester: pytest.Pytester) -> None:
    _, sandboxed = run_both(
        run_inner,
        pytester,
        ATTEMPTS
        + """
@pytest.mark.parametrize("n", range(4))
def test_fails_once(request, n):
    assert attempt(request) >= 1
""",
        "--reruns",
        "1",
        "-n",
        "2",
        ordered=False,
    )
    assert_counts(sandboxed, passed=4, rerun=4)
