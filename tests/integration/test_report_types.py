"""Every report of a sandboxed test comes back as what it was: the same inner test file, run plain
and with --nsbox-all, gives the same summary, short summary lines and junit-xml."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import summary_line

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]
builtin_subtests = pytest.mark.skipif(pytest.version_tuple < (9,), reason="pytest < 9 has no built-in subtests")

SHORT_SUMMARY_TITLE = "short test summary info"
TIMING_ATTRIBUTES = ("time", "timestamp", "hostname")
ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def short_summary(result: pytest.RunResult) -> list[str]:
    """The ``-rA`` lines, sorted (xdist changes their order)."""
    lines = result.outlines
    start = max(i for i, line in enumerate(lines) if SHORT_SUMMARY_TITLE in line)
    return sorted(line for line in lines[start + 1 : -1] if line.strip())


def junit_content(path: Path) -> list[str]:
    """Each testcase of a junit-xml file as text (sorted), then each suite without its testcases;
    without times and the plugin's own properties."""
    root = ET.parse(path).getroot()
    cases, suites = [], []
    for suite in root.iter("testsuite"):
        for name in TIMING_ATTRIBUTES:
            suite.attrib.pop(name, None)
        for case in suite.findall("testcase"):
            case.attrib.pop("time", None)
            for properties in case.findall("properties"):
                for prop in properties.findall("property"):
                    if prop.get("name", "").startswith("nsbox_"):
                        properties.remove(prop)
                if not len(properties):
                    case.remove(properties)
            cases.append(ADDRESS.sub(" at 0x?", ET.tostring(case, encoding="unicode")))
            suite.remove(case)
        suites.append(ET.tostring(suite, encoding="unicode"))
    return sorted(cases) + suites


def run_plain_and_sandboxed(
    run_inner, source: str, *args: str, conftest: str | None = None
) -> tuple[pytest.RunResult, pytest.RunResult]:
    plain = run_inner(source, *args, conftest=conftest)
    sandboxed = run_inner(source, "--nsbox-all", *args, conftest=conftest)
    return plain, sandboxed


SUBTESTS = """
import unittest
import pytest

def test_fixture_subtests(subtests):
    for i in range(4):
        with subtests.test("numbers", i=i):
            assert i != 2

def test_all_subtests_pass(subtests):
    for i in range(3):
        with subtests.test(i=i):
            print("subtest", i)

def test_subtest_skips_and_xfails(subtests):
    with subtests.test("skipping"):
        pytest.skip("not here")
    with subtests.test("expected"):
        pytest.xfail("known")

class TestUnittest(unittest.TestCase):
    def test_subtest_fails(self):
        for i in range(3):
            with self.subTest(i=i):
                self.assertNotEqual(i, 1)

    def test_subtests_pass(self):
        for i in range(3):
            with self.subTest(i=i):
                pass
"""


@builtin_subtests
@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["serial", "xdist"])
def test_subtests_are_counted_as_without_sandbox(run_inner, xdist: tuple[str, ...]) -> None:
    plain, sandboxed = run_plain_and_sandboxed(run_inner, SUBTESTS, "-q", *xdist)  # -q: pytest counts passed subtests
    assert summary_line(plain) == "3 failed, 4 passed, 1 skipped, 1 xfailed, 11 subtests passed"
    assert summary_line(sandboxed) == summary_line(plain)
    assert short_summary(sandboxed) == short_summary(plain)


@builtin_subtests
def test_subtests_in_junit_as_without_sandbox(run_inner, pytester: pytest.Pytester) -> None:
    plain = run_inner(SUBTESTS, "--junitxml=plain.xml")
    sandboxed = run_inner(SUBTESTS, "--nsbox-all", "--junitxml=sandboxed.xml")
    assert summary_line(sandboxed) == summary_line(plain)
    assert junit_content(pytester.path / "sandboxed.xml") == junit_content(pytester.path / "plain.xml")


@builtin_subtests
def test_failed_subtest_under_exitfirst_stops_as_without_sandbox(run_inner) -> None:
    source = """
        import pytest

        @pytest.fixture(scope="session")
        def shared():
            yield
            print("session fixture torn down")

        def test_stops(shared, subtests):
            for i in range(3):
                with subtests.test(i=i):
                    assert i == 5

        def test_not_reached():
            pass
        """
    plain, sandboxed = run_plain_and_sandboxed(run_inner, source, "-x", "-s")
    assert summary_line(sandboxed) == summary_line(plain)
    assert short_summary(sandboxed) == short_summary(plain)
    assert sandboxed.stdout.str().count("session fixture torn down") == 1  # by P, never also in the sandbox


CUSTOM_REPORT_CONFTEST = """
import pytest

class NoteReport(pytest.TestReport):
    '''A plugin's own report class: it logs one per test and round-trips it itself.'''

def pytest_report_to_serializable(report):
    if isinstance(report, NoteReport):
        data = report._to_json()
        data["_report_type"] = "NoteReport"
        return data

def pytest_report_from_serializable(data):
    if data.get("_report_type") == "NoteReport":
        return NoteReport._from_json(data)

@pytest.fixture
def note(request):
    def log(text):
        report = NoteReport(request.node.nodeid, request.node.location, {}, "passed", None, "call", [("note", text)])
        request.node.ihook.pytest_runtest_logreport(report=report)
    return log

logged = []

def pytest_runtest_logreport(report):
    logged.append(f"{type(report).__name__} {report.when} {dict(report.sections).get('note', '')}")

def pytest_terminal_summary(terminalreporter):
    for line in logged:
        terminalreporter.write_line("logged: " + line)
"""


def test_reports_of_a_plugins_own_class_round_trip(run_inner) -> None:
    source = """
        def test_notes(note):
            note("first")
            note("second")
        """
    plain, sandboxed = run_plain_and_sandboxed(run_inner, source, conftest=CUSTOM_REPORT_CONFTEST)
    logged = [line for line in plain.outlines if line.startswith("logged: ")]
    assert logged == [
        "logged: TestReport setup ",
        "logged: NoteReport call first",
        "logged: NoteReport call second",
        "logged: TestReport call ",
        "logged: TestReport teardown ",
    ]
    assert [line for line in sandboxed.outlines if line.startswith("logged: ")] == logged
    assert summary_line(sandboxed) == summary_line(plain)


INNER_SESSION = """
pytest_plugins = ["pytester"]

def test_runs_a_pytest_session_in_process(pytester):
    pytester.makepyfile(test_nested="def test_a(): pass\\ndef test_b(): assert 0\\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)

def test_after():
    pass
"""


@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["serial", "xdist"])
def test_inner_session_keeps_its_reports(run_inner, xdist: tuple[str, ...]) -> None:
    result = run_inner(INNER_SESSION, "--nsbox-all", *xdist)
    result.assert_outcomes(passed=2)
    assert short_summary(result) == [
        "PASSED test_inner.py::test_after",
        "PASSED test_inner.py::test_runs_a_pytest_session_in_process",
    ]


WARNINGS_AND_RECORDS = """
import logging
import warnings
import pytest

log = logging.getLogger("inner")

class OwnWarning(UserWarning):
    pass

def test_warns():
    warnings.warn("plain user warning")
    warnings.warn("deprecated thing", DeprecationWarning)
    warnings.warn("own class", OwnWarning)

def test_recwarn(recwarn):
    warnings.warn("caught", UserWarning)
    assert len(recwarn) == 1

def test_pytest_warns():
    with pytest.warns(UserWarning, match="expected"):
        warnings.warn("expected")

@pytest.mark.filterwarnings("error")
def test_error_mark():
    warnings.warn("becomes an error")

def test_records(record_property, record_xml_attribute, record_testsuite_property):
    record_property("answer", 42)
    record_xml_attribute("flavour", "sour")
    record_testsuite_property("suite_prop", "yes")

def test_caplog(caplog):
    caplog.set_level(logging.INFO)
    log.info("hello %s", "there")
    assert caplog.records[0].getMessage() == "hello there"

def test_logs_and_fails():
    log.warning("about to fail")
    assert 0
"""
WARNINGS_SUMMARY_TITLE = "warnings summary"


def warnings_summary(result: pytest.RunResult) -> list[str]:
    lines = result.outlines
    start = next(i for i, line in enumerate(lines) if WARNINGS_SUMMARY_TITLE in line)
    end = next(i for i, line in enumerate(lines) if i > start and line.startswith("-- Docs:"))
    return lines[start:end]


def test_warnings_and_junit_records_as_without_sandbox(run_inner, pytester: pytest.Pytester) -> None:
    args = ("-o", "junit_family=xunit1")  # record_xml_attribute needs it
    plain = run_inner(WARNINGS_AND_RECORDS, *args, "--junitxml=plain.xml")
    sandboxed = run_inner(WARNINGS_AND_RECORDS, *args, "--nsbox-all", "--junitxml=sandboxed.xml")
    assert summary_line(plain) == "2 failed, 5 passed, 4 warnings"
    assert summary_line(sandboxed) == summary_line(plain)
    assert short_summary(sandboxed) == short_summary(plain)
    assert warnings_summary(sandboxed) == warnings_summary(plain)
    plain_xml = junit_content(pytester.path / "plain.xml")
    assert any('flavour="sour"' in case for case in plain_xml)
    assert any('name="suite_prop"' in suite for suite in plain_xml)
    assert junit_content(pytester.path / "sandboxed.xml") == plain_xml


def test_warning_as_error_as_without_sandbox(run_inner) -> None:
    plain, sandboxed = run_plain_and_sandboxed(run_inner, WARNINGS_AND_RECORDS, "-W", "error", "-k", "warns or recwarn")
    assert summary_line(plain) == "1 failed, 2 passed, 4 deselected"
    assert summary_line(sandboxed) == summary_line(plain)
    assert short_summary(sandboxed) == short_summary(plain)


def test_live_logging_as_without_sandbox(run_inner) -> None:
    args = ("-o", "log_cli=true", "-o", "log_cli_level=INFO", "-k", "caplog or logs_and_fails")
    plain, sandboxed = run_plain_and_sandboxed(run_inner, WARNINGS_AND_RECORDS, *args)

    def live_log(result: pytest.RunResult) -> list[str]:
        start = next(i for i, line in enumerate(result.outlines) if line.startswith("test_inner.py::"))
        end = next(i for i, line in enumerate(result.outlines) if "= FAILURES =" in line)
        return result.outlines[start:end]

    assert "INFO     inner:test_inner.py:34 hello there" in live_log(plain)
    assert live_log(sandboxed) == live_log(plain)
    assert summary_line(sandboxed) == summary_line(plain)
