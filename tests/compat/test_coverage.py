"""pytest-cov and coverage.py count the lines sandboxed tests run, as without sandboxing.

A sample project (two modules, a branch, a subprocess measured through coverage's ``[run] patch =
subprocess``) gets the same coverage report, line for line, with ``--nsbox-all`` as without: with
pytest-cov serially and under xdist, and with ``coverage run -m pytest``.
"""

from __future__ import annotations

import sys

import pytest

from pytest_nsbox import carry_coverage

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]

SAMPLE_FILES = {
    "pkg/__init__.py": "",
    "pkg/calc.py": """
def classify(n):
    if n < 0:
        return "negative"
    return "non-negative"


def double(n):
    return 2 * n
""",
    "pkg/tool.py": """
import sys


def main(argv):
    if argv and argv[0] == "loud":
        print("LOUD")
    else:
        print("quiet")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
""",
    "test_sample.py": """
import subprocess
import sys

from pkg import calc


def test_classify():
    assert calc.classify(-1) == "negative"
    assert calc.classify(1) == "non-negative"


def test_subprocess():
    out = subprocess.run([sys.executable, "-m", "pkg.tool", "loud"], capture_output=True, text=True, check=True)
    assert out.stdout == "LOUD\\n"
    assert calc.double(2) == 4
""",
    # coverage 7.x measures Python subprocesses with this (it implies parallel = true)
    ".coveragerc": "[run]\npatch = subprocess\n",
}
# The inner runs leave out the plugins that change or break runs beside the point here.
INNER_ARGS = ("-p", "no:cacheprovider", "-p", "no:randomly")
PYTEST_COV_ARGS = ("--cov=pkg", "--cov-branch", "--cov-report=term-missing")


@pytest.fixture
def sample(pytester: pytest.Pytester) -> pytest.Pytester:
    for name, text in SAMPLE_FILES.items():
        path = pytester.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.lstrip("\n"))
    return pytester


def report_table(result: pytest.RunResult) -> list[str]:
    """The coverage report's table, from its ``Name`` header to its ``TOTAL`` line."""
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if line.startswith("Name "))
    end = next(i for i, line in enumerate(lines) if line.startswith("TOTAL "))
    return lines[start : end + 1]


def run_pytest_cov(sample: pytest.Pytester, *args: str) -> pytest.RunResult:
    return sample.runpytest_subprocess(*INNER_ARGS, *PYTEST_COV_ARGS, *args, timeout=300)


def total_percent(table: list[str]) -> int:
    return int(table[-1].split()[-1].rstrip("%"))


@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["serial", "xdist"])
def test_pytest_cov_report_is_the_same_sandboxed(sample: pytest.Pytester, xdist: tuple[str, ...]) -> None:
    plain = run_pytest_cov(sample, *xdist)
    plain.assert_outcomes(passed=2)
    sandboxed = run_pytest_cov(sample, *xdist, "--nsbox-all")
    sandboxed.assert_outcomes(passed=2)
    sandboxed.stdout.fnmatch_lines(["*nsbox: peak memory of sandboxed tests*"])  # they did run sandboxed
    assert report_table(sandboxed) == report_table(plain)
    # the sample measures what each part contributes: the test process, and its subprocess (tool.py)
    assert any(line.startswith("pkg/tool.py ") and line.split()[1] != line.split()[2] for line in report_table(plain))
    assert carry_coverage.LOST not in sandboxed.stdout.str()


def test_coverage_run_report_is_the_same_sandboxed(sample: pytest.Pytester) -> None:
    tables = []
    for extra in [(), ("--nsbox-all",)]:
        for leftover in sample.path.glob(".coverage*"):
            if leftover.name != ".coveragerc":
                leftover.unlink()
        run = sample.run(sys.executable, "-m", "coverage", "run", "--branch", "-m", "pytest", *INNER_ARGS, *extra, timeout=300)
        run.assert_outcomes(passed=2)
        assert sample.run(sys.executable, "-m", "coverage", "combine").ret == 0
        report = sample.run(sys.executable, "-m", "coverage", "report", "-m", "--include=pkg/*")
        assert report.ret == 0
        tables.append(report_table(report))
    plain, sandboxed = tables
    assert sandboxed == plain


def test_fail_under_decides_the_same_sandboxed(sample: pytest.Pytester) -> None:
    total = total_percent(report_table(run_pytest_cov(sample)))
    assert 0 < total < 100
    for extra in [(), ("--nsbox-all",)]:
        reached = run_pytest_cov(sample, f"--cov-fail-under={total}", *extra)
        assert reached.ret == pytest.ExitCode.OK, reached.stdout.str()
        missed = run_pytest_cov(sample, f"--cov-fail-under={total + 1}", *extra)
        assert missed.ret == pytest.ExitCode.TESTS_FAILED
        missed.stdout.fnmatch_lines(["*FAIL Required test coverage of*not reached*"])


def test_a_test_killed_by_its_timeout_says_its_coverage_is_lost(sample: pytest.Pytester) -> None:
    sample.makepyfile(
        test_sample="""
        import time
        import pytest
        from pkg import calc

        @pytest.mark.nsbox(timeout=1)
        def test_slow():
            calc.double(1)
            time.sleep(60)
        """
    )
    result = run_pytest_cov(sample)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_sample.py::test_slow: state from the sandbox was not carried back: coverage: *"])
    assert carry_coverage.LOST in " ".join(result.stdout.lines)
