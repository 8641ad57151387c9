"""Limits from the command line, the ini and stacked markers; the header; --collect-only; limits
too small for a sandbox to start.

The inner conftest writes each test's spec, as P used it, to specs.json (pytest_nsbox_sandbox_finished),
so precedence is checked exactly; one behavioural check shows a marker's ``memory=None`` really lifts
a command-line limit (wide margins: 128M limit, 256M allocation).
"""

from __future__ import annotations

import json
import os
import re

import pytest

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns, pytest.mark.needs_cgroup_limits]

SPEC_CONFTEST = """
import json, os

def pytest_nsbox_sandbox_finished(item, spec, result):
    specs = json.load(open("specs.json")) if os.path.exists("specs.json") else {}
    specs[item.name] = {"memory": spec.memory, "pids": spec.pids, "cpus": spec.cpus, "timeout": spec.timeout,
                        "image": spec.image}
    json.dump(specs, open("specs.json", "w"))
"""
MIB = 2**20


def test_precedence_marker_over_command_line_over_ini(run_inner, pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nnsbox_memory = 64M\nnsbox_cpus = 1.5\nnsbox_timeout = 600\nnsbox_pids = 500\n")
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox
        def test_defaults():
            pass

        @pytest.mark.nsbox(memory="32M", timeout=None, pids=0, cpus=0)
        def test_marker_wins():
            pass

        @pytest.mark.nsbox(memory=None)
        def test_memory_off_really_lifts_the_limit():
            data = bytearray(256 * 2**20)  # twice the command line's limit
            assert data[-1] == 0
        """,
        "--nsbox-memory=128M",
        "--nsbox-timeout=300",
        conftest=SPEC_CONFTEST,
    )
    result.assert_outcomes(passed=3)
    specs = json.loads((pytester.path / "specs.json").read_text())
    assert specs["test_defaults"] == {"memory": 128 * MIB, "pids": 500, "cpus": 1.5, "timeout": 300.0, "image": "host"}
    # pids=0: the ini's 500 is off, the safety cap (1024) applies in the cgroup
    assert specs["test_marker_wins"] == {"memory": 32 * MIB, "pids": None, "cpus": None, "timeout": None, "image": "host"}
    assert specs["test_memory_off_really_lifts_the_limit"]["memory"] is None


def test_command_line_image_over_ini(run_inner, pytester: pytest.Pytester, tiny_image) -> None:
    pytester.makeini("[pytest]\nnsbox_image = host\n")
    result = run_inner(
        """
        def test_runs_in_the_command_line_image():
            assert "nsbox-tiny" in open("/etc/os-release").read()
        """,
        "--nsbox-all",
        f"--nsbox-image={tiny_image}",
    )
    result.assert_outcomes(passed=1)


def test_stacked_markers_closest_wins_per_keyword(run_inner, pytester: pytest.Pytester) -> None:
    result = run_inner(
        """
        import pytest
        from pytest_nsbox import nsbox

        pytestmark = pytest.mark.nsbox(cpus=0.5, memory="256M")

        @nsbox(timeout=600, memory="128M")
        class TestStacked:
            @nsbox(memory="64M")
            def test_merged(self):
                pass

            @nsbox(memory="64M")
            @nsbox(memory="96M")
            def test_clash_on_one_level(self):
                raise AssertionError("never runs")
        """,
        conftest=SPEC_CONFTEST,
    )
    result.assert_outcomes(passed=1, errors=1)
    specs = json.loads((pytester.path / "specs.json").read_text())
    assert specs["test_merged"] == {"memory": 64 * MIB, "pids": None, "cpus": 0.5, "timeout": 600.0, "image": "host"}
    result.stdout.fnmatch_lines(
        [
            "*nsbox marker on test_inner.py::TestStacked::test_clash_on_one_level: stacked nsbox markers on one level "
            "give memory two values (*); keep one*"
        ]
    )
    assert "never runs" not in result.stdout.str()


def test_bad_command_line_value_is_a_usage_error(run_inner) -> None:
    result = run_inner("def test_x(): pass", "--nsbox-memory=lots")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*pytest-nsbox: invalid memory 'lots' from option --nsbox-memory (expected int bytes*"])


def test_collect_only_reports_invalid_markers(run_inner) -> None:
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox(memroy="1G")
        def test_typo():
            pass

        @pytest.mark.nsbox(memory="lots")
        def test_bad_value():
            pass

        @pytest.mark.nsbox(memory="64M")
        def test_fine():
            pass
        """,
        "--collect-only",
    )
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines_random(
        [
            "*nsbox marker on test_inner.py::test_typo: nsbox() got an unexpected keyword argument 'memroy' "
            "(did you mean 'memory'?); valid keywords: image, memory, pids, cpus, timeout, network*",
            "*invalid memory 'lots' from nsbox marker on test_inner.py::test_bad_value (expected int bytes*",
            "*2 errors*",
        ]
    )


EXPECT_SOURCE = """
import pytest
from pytest_nsbox import nsbox

pytestmark = pytest.mark.nsbox(memory="128M", pids=32, expect_limits=("memory", "pids"))

@nsbox(expect_limits="pids")
class TestStacked:
    def test_class_expects_pids(self):
        pass

    @nsbox(expect_limits=None)
    def test_expects_nothing(self):
        pass

def test_module_expects_both():
    pass

@nsbox(memory=None)
def test_drops_the_expected_memory():
    raise AssertionError("never runs")

@nsbox(pids=32, expect_limits="pids")
@nsbox(expect_limits="memory")
def test_clash_on_one_level():
    raise AssertionError("never runs")
"""
EXPECT_CONFTEST = """
import json, os

def pytest_nsbox_sandbox_finished(item, spec, result):
    specs = json.load(open("specs.json")) if os.path.exists("specs.json") else {}
    specs[item.name] = list(spec.expect_limits)
    json.dump(specs, open("specs.json", "w"))
"""
DROPPED_EXPECTED_MEMORY = (
    "*nsbox marker on test_inner.py::test_drops_the_expected_memory: expect_limits names memory, "
    "but the test has no memory limit*"
)
EXPECT_CLASH = (
    "*nsbox marker on test_inner.py::test_clash_on_one_level: stacked nsbox markers on one level give expect_limits "
    "two values (*); keep one*"
)


def test_expect_limits_in_stacked_markers(run_inner, pytester: pytest.Pytester) -> None:
    """Closest marker wins, None expects nothing; a marker that drops the limit an outer one
    expects, or two on one level that disagree, are errors: under --collect-only, collection errors."""
    result = run_inner(EXPECT_SOURCE, conftest=EXPECT_CONFTEST)
    result.assert_outcomes(passed=3, errors=2)
    specs = json.loads((pytester.path / "specs.json").read_text())
    assert specs == {
        "test_class_expects_pids": ["pids"],
        "test_expects_nothing": [],
        "test_module_expects_both": ["memory", "pids"],
    }
    result.stdout.fnmatch_lines([DROPPED_EXPECTED_MEMORY])
    result.stdout.fnmatch_lines([EXPECT_CLASH])
    assert "never runs" not in result.stdout.str()
    collected = run_inner(EXPECT_SOURCE, "--collect-only")
    assert collected.ret == pytest.ExitCode.INTERRUPTED
    collected.stdout.fnmatch_lines_random([DROPPED_EXPECTED_MEMORY, EXPECT_CLASH, "*2 errors*"])


@pytest.mark.both_build_modes
def test_header_names_mode_and_defaults(run_inner, pytester: pytest.Pytester, build_mode: str) -> None:
    pytester.makeini("[pytest]\nnsbox_cpus = 0.5\n")
    result = run_inner("def test_x(): pass", "--nsbox-memory=256M")
    user = "root" if os.getuid() == 0 else "rootless"
    result.stdout.fnmatch_lines(
        [
            f"nsbox: {user}, {build_mode}, cgroup v[12]; defaults: image=host, memory=256 MiB (command line), "
            "pids=1024 (built-in), cpus=0.5 (ini), disk=* (built-in); memory budget * (available at the start)"
        ]
    )


@pytest.mark.both_build_modes
def test_memory_too_small_to_start_is_an_error_with_a_value_that_works(run_inner, pytester: pytest.Pytester) -> None:
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox(memory="1M")
        def test_tiny():
            raise AssertionError("never runs")
        """,
        "--nsbox-memory-report=0",
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*nsbox: memory limit of 1 MiB is too small for a sandbox to start here: an empty sandbox peaked at *; "
            "use memory='*M' or more*"
        ]
    )
    assert "SKIPPED" not in result.stdout.str() and "never runs" not in result.stdout.str()
    suggested = re.search(r"use memory='(\d+M)' or more", result.stdout.str())
    assert suggested is not None
    works = run_inner(
        f"""
        import pytest

        @pytest.mark.nsbox(memory="{suggested.group(1)}")
        def test_at_the_suggested_limit():
            pass
        """
    )
    works.assert_outcomes(passed=1)


def test_pids_too_small_to_start_is_an_error(run_inner) -> None:
    """The forked form needs the unsharer, the sandbox's init and the test in the cgroup."""
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox(pids=2)
        def test_two():
            raise AssertionError("never runs")

        @pytest.mark.nsbox(pids=3)
        def test_three():
            pass
        """,
        "-o",
        "nsbox_prebuild=false",
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*nsbox: pids limit 2 is too small for a sandbox to start: it needs 3 *use pids=3 or more*"])
