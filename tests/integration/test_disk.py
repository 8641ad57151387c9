"""The disk bound: everything a sandboxed test writes (its writable layer, /tmp, /var/tmp, /run,
/dev/shm) shares one bound, given by the marker, --nsbox-disk or ini nsbox_disk, else a default;
filling it is ENOSPC inside and a FAILED test naming the bound."""

from __future__ import annotations

import json
import re

import pytest

from pytest_nsbox.reports import DISK_FULL

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # the short summary lines whole


MIB = 2**20
DISK_REACHED = "nsbox: disk limit of 8 MiB reached"
assert DISK_FULL.startswith("nsbox: disk limit of {limit} reached")


def test_every_writable_place_shares_one_bound(run_inner) -> None:
    result = run_inner(
        """
        import errno, os, pytest
        from pytest_nsbox import nsbox

        def write(path, mib):
            with open(path, "wb") as handle:
                handle.write(b"x" * mib * 2**20)

        @pytest.mark.parametrize("place", ["/tmp/f", "/var/tmp/f", "/run/f", "/dev/shm/f", "/etc/f", "/usr/f"])
        @nsbox(disk="8M")
        def test_one_place_fills_it(place):
            write(place, 16)

        @nsbox(disk="8M")
        def test_places_add_up():
            write("/tmp/a", 3)
            write("/dev/shm/b", 3)
            with pytest.raises(OSError) as caught:
                write("/etc/c", 3)  # the writable layer of "/" takes what is left
            assert caught.value.errno == errno.ENOSPC

        @nsbox(disk="8M")
        def test_within_the_bound():
            write("/tmp/a", 2)
            write("/etc/b", 2)
            usage = os.statvfs("/tmp")
            assert usage.f_blocks * usage.f_frsize == 8 * 2**20
        """
    )
    result.assert_outcomes(passed=1, failed=7)
    outcomes = result.stdout.str()
    for place in ["/tmp/f", "/var/tmp/f", "/run/f", "/dev/shm/f", "/etc/f", "/usr/f"]:
        assert re.search(rf"FAILED test_inner.py::test_one_place_fills_it\[{re.escape(place)}\] - {DISK_REACHED}", outcomes)
    # caught inside or not, a test that filled its bound fails with the cause first
    assert re.search(rf"FAILED test_inner.py::test_places_add_up - (Failed: )?{DISK_REACHED}", outcomes)
    assert "No space left on device" in outcomes
    assert "PASSED test_inner.py::test_within_the_bound" in outcomes


def test_an_image_s_writable_layer_is_bounded_too(run_inner) -> None:
    result = run_inner(
        """
        from pytest_nsbox import nsbox

        @nsbox(image="busybox", disk="8M")
        def test_fill_the_layer():
            open("/bin/big", "wb").write(b"x" * 16 * 2**20)
        """
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"FAILED test_inner.py::test_fill_the_layer - *{DISK_REACHED}*"])


SPEC_CONFTEST = """
import json, os

def pytest_nsbox_sandbox_finished(item, spec, result):
    specs = json.load(open("specs.json")) if os.path.exists("specs.json") else {}
    specs[item.name] = spec.disk
    json.dump(specs, open("specs.json", "w"))
"""


def test_marker_over_command_line_over_ini_over_the_default(run_inner, pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nnsbox_disk = 64M\n")
    source = """
        import os
        from pytest_nsbox import nsbox

        def size():
            usage = os.statvfs("/dev/shm")
            return usage.f_blocks * usage.f_frsize

        @nsbox
        def test_default():
            print("SIZE", size())

        @nsbox(disk="32M")
        def test_marker():
            assert size() == 32 * 2**20

        @nsbox(disk=None)
        def test_marker_none_is_the_built_in_bound():
            print("SIZE", size())
        """
    result = run_inner(source, "--nsbox-disk=48M", conftest=SPEC_CONFTEST)
    result.assert_outcomes(passed=3)
    specs = json.loads((pytester.path / "specs.json").read_text())
    assert specs["test_default"] == 48 * MIB and specs["test_marker"] == 32 * MIB
    header = re.search(r"disk=(\S+ \S+) \(command line\)", result.stdout.str())
    assert header and header[1] == "48 MiB"
    built_in = specs["test_marker_none_is_the_built_in_bound"]
    assert built_in >= 256 * MIB and f"SIZE {built_in}" in result.stdout.str()
    result = run_inner(source, conftest=SPEC_CONFTEST)
    assert json.loads((pytester.path / "specs.json").read_text())["test_default"] == 64 * MIB


def test_the_built_in_bound_is_in_the_header_and_holds(run_inner) -> None:
    result = run_inner(
        """
        import os
        from pytest_nsbox import nsbox

        @nsbox
        def test_size():
            usage = os.statvfs("/tmp")
            print("SIZE", usage.f_blocks * usage.f_frsize)
        """,
        "-s",
    )
    result.assert_outcomes(passed=1)
    text = result.stdout.str()
    header = re.search(r"disk=(\d+(?:\.\d)?) (MiB|GiB) \(built-in\)", text)
    size = re.search(r"SIZE (\d+)", text)
    assert header and size, text
    shown = float(header[1]) * (2**30 if header[2] == "GiB" else 2**20)
    assert abs(int(size[1]) - shown) <= 0.05 * 2**30  # the header rounds to a tenth of a GiB
    meminfo = open("/proc/meminfo").read()
    total = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo)[1]) * 1024  # type: ignore[index]
    assert int(size[1]) <= total // 2  # never more than the machine can hold


@pytest.mark.parametrize("bad", ["'512K'", "'lots'", "-1"])
def test_bad_disk_values_name_the_test_and_the_value(run_inner, bad: str) -> None:
    result = run_inner(
        f"""
        from pytest_nsbox import nsbox

        @nsbox(disk={bad})
        def test_bad():
            raise AssertionError("the body never runs")
        """
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*invalid disk {bad} from nsbox marker on test_inner.py::test_bad*"])


@pytest.mark.needs_cgroup_limits
def test_writes_stay_charged_to_the_memory_limit(run_inner) -> None:
    result = run_inner(
        """
        from pytest_nsbox import nsbox

        @nsbox(memory="64M", disk="512M")
        def test_tmpfs_pages_are_memory():
            with open("/dev/shm/big", "wb") as handle:
                for _ in range(256):
                    handle.write(b"x" * 2**20)
        """
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_tmpfs_pages_are_memory - *exceeded its memory limit of 64 MiB*"])


def test_a_test_may_expect_to_fill_its_disk(run_inner, pytester: pytest.Pytester) -> None:
    """expect_limits="disk": a test that checks how its code takes ENOSPC passes; without the
    expectation it fails; uncaught, it fails with the bound first, marked as expected."""
    result = run_inner(
        """
        import errno, pytest
        from pytest_nsbox import nsbox

        def fill(path):
            with pytest.raises(OSError) as caught:
                with open(path, "wb") as handle:
                    for _ in range(64):
                        handle.write(b"x" * 2**20)
                        handle.flush()
            assert caught.value.errno == errno.ENOSPC

        @nsbox(disk="8M", expect_limits="disk")
        def test_expected():
            fill("/tmp/f")

        @nsbox(disk="8M")
        def test_not_expected():
            fill("/tmp/f")

        @nsbox(disk="8M", expect_limits="disk")
        def test_expected_uncaught():
            open("/tmp/f", "wb").write(b"x" * 16 * 2**20)
        """,
        "--junitxml=junit.xml",
    )
    result.assert_outcomes(passed=1, failed=2)
    outcomes = result.stdout.str()
    assert "PASSED test_inner.py::test_expected" in outcomes
    assert re.search(rf"FAILED test_inner.py::test_not_expected - (Failed: )?{DISK_REACHED}: .* filled it$", outcomes, re.M)
    assert re.search(rf"FAILED test_inner.py::test_expected_uncaught - {DISK_REACHED}.*, as the marker expects", outcomes)
    result.stdout.fnmatch_lines(["*_ test_expected _*", "*- nsbox: limit -*", f"{DISK_REACHED}*, as the marker expects*"])
    xml = (pytester.path / "junit.xml").read_text()
    assert '<property name="nsbox_expected_limit" value="disk" />' in xml
