"""xdist, mixed marked and unmarked tests, --nsbox-all."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]

MIXED = """
import os, socket, pytest

@pytest.fixture(scope="module")
def shared():
    return os.getpid()

@pytest.mark.parametrize("n", range(12))
def test_mixed(n, shared):
    inside = socket.gethostname() == "nsbox"
    assert inside == (n % 3 == 0), n
    assert (os.getpid() == shared) == (not inside)

def pytest_collection_modifyitems(items):
    pass
"""

MARK_EVERY_THIRD = """
import pytest

def pytest_collection_modifyitems(items):
    for item in items:
        if item.callspec.params["n"] % 3 == 0:
            item.add_marker(pytest.mark.nsbox)
"""


@pytest.mark.parametrize("args", [(), ("-n", "2"), ("-n", "2", "--dist", "loadfile")])
def test_mixed_with_unmarked_tests(run_inner, args: tuple[str, ...]) -> None:
    result = run_inner(MIXED, *args, conftest=MARK_EVERY_THIRD)
    result.assert_outcomes(passed=12)


def test_xdist_reports_crashes_and_failures(run_inner) -> None:
    result = run_inner(
        """
        import os, signal, pytest

        @pytest.mark.nsbox
        def test_crash():
            os.kill(os.getpid(), signal.SIGSEGV)

        @pytest.mark.nsbox
        def test_fail():
            assert 1 == 2

        @pytest.mark.nsbox
        @pytest.mark.parametrize("n", range(6))
        def test_ok(n):
            pass
        """,
        "-n",
        "2",
    )
    result.assert_outcomes(passed=6, failed=2)
    result.stdout.fnmatch_lines(["*crashed with signal SIGSEGV*"])


def test_nsbox_all_sandboxes_every_test(run_inner) -> None:
    result = run_inner(
        """
        import socket

        def test_unmarked():
            assert socket.gethostname() == "nsbox"
        """,
        "--nsbox-all",
    )
    result.assert_outcomes(passed=1)


def test_ini_image_default(run_inner, pytester: pytest.Pytester, tiny_image) -> None:
    pytester.makeini(f"[pytest]\nnsbox_image = {tiny_image}\n")
    result = run_inner(
        """
        import pytest

        @pytest.mark.nsbox
        def test_default_image():
            assert "nsbox-tiny" in open("/etc/os-release").read()

        @pytest.mark.nsbox(image="host")
        def test_marker_overrides():
            assert "nsbox-tiny" not in open("/etc/os-release").read()
        """
    )
    result.assert_outcomes(passed=2)
