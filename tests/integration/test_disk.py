"""The disk bound: everything a sandboxed test writes (its writable layer, /tmp, /var/tmp, /run,
/dev/shm) shares one bound, given by the marker, --nsbox-disk or ini nsbox_disk, else a default;
filling it is ENOSPC inside and a FAILED test naming the bound."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_nsbox.box import diskscratch, faults
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


# --- scratch="disk": the writable places in a directory on the host's disk --------------------


@pytest.fixture
def disk_base(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TMPDIR of the inner run: where its disk scratches go (beside, never inside, its rootdir)."""
    base = tmp_path_factory.mktemp("scratch-base")
    fstype = diskscratch.filesystem_type(str(base))
    if fstype in diskscratch.MEMORY_FILESYSTEMS + diskscratch.NO_UPPER_FILESYSTEMS:
        pytest.skip(f"scratch='disk' cannot be tested here: pytest's basetemp is on {fstype} (User-Mode Linux's /tmp is)")
    monkeypatch.setenv("TMPDIR", str(base))
    return base


def run_dirs(base: Path) -> list[Path]:
    """The disk scratch directories of pytest processes under *base* (one per process while it runs)."""
    user = base / f"{diskscratch.USER_DIR_PREFIX}{os.getuid()}"
    return sorted(user.glob(f"{diskscratch.RUN_PREFIX}*")) if user.exists() else []


@pytest.mark.needs_cgroup_limits
@pytest.mark.both_build_modes
def test_a_disk_scratch_holds_more_than_the_memory_limit(run_inner, disk_base: Path) -> None:
    """64M written with memory="32M": on disk it passes; in memory (a tmpfs) it cannot."""
    result = run_inner(
        """
        import os
        from pytest_nsbox import nsbox

        def write(path, mib):
            with open(path, "wb") as handle:
                for _ in range(mib):
                    handle.write(b"x" * 2**20)
                    handle.flush()
                os.fsync(handle.fileno())

        @nsbox(scratch="disk", memory="32M", disk="256M")
        def test_on_disk():
            write("/tmp/big", 48)
            write("/etc/big", 16)  # the writable layer of "/" too
            assert os.path.getsize("/tmp/big") + os.path.getsize("/etc/big") == 64 * 2**20

        @nsbox(memory="32M", disk="256M")
        def test_in_memory():
            write("/tmp/big", 48)
            write("/etc/big", 16)
        """
    )
    result.assert_outcomes(passed=1, failed=1)
    outcomes = result.stdout.str()
    assert "PASSED test_inner.py::test_on_disk" in outcomes
    assert re.search(r"FAILED test_inner.py::test_in_memory - .*exceeded its memory limit of 32 MiB", outcomes)
    assert run_dirs(disk_base) == []  # removed at the end of the run


@pytest.mark.both_build_modes
def test_the_disk_bound_holds_on_disk(run_inner, disk_base: Path, pytester: pytest.Pytester) -> None:
    """P measures the disk scratch while the test runs and kills the sandbox over the bound; a
    test that wrote too much and ended before P looked is caught by P's last look; a directory
    the test closed (mode 000) hides nothing (rootless, P's helper in a user namespace reads it)."""
    result = run_inner(
        """
        import os, time
        from pytest_nsbox import nsbox

        @nsbox(scratch="disk", disk="8M")
        def test_keeps_writing():
            with open("/dev/shm/f", "wb") as handle:
                for _ in range(4096):  # 4 GiB, never reached: the sandbox is killed first
                    handle.write(b"x" * 2**20)
                    handle.flush()
                    time.sleep(0.001)

        @nsbox(scratch="disk", disk="8M")
        def test_writes_and_ends():
            open("/var/tmp/a", "wb").write(b"x" * 6 * 2**20)
            open("/usr/b", "wb").write(b"x" * 6 * 2**20)

        @nsbox(scratch="disk", disk="8M")
        def test_hides_in_a_closed_directory():
            os.mkdir("/tmp/closed")
            os.chmod("/tmp/closed", 0)  # root inside writes there all the same; pytest must see it too
            with open("/tmp/closed/f", "wb") as handle:
                for _ in range(4096):
                    handle.write(b"x" * 2**20)
                    handle.flush()
                    time.sleep(0.001)

        @nsbox(scratch="disk", disk="8M", image="busybox")
        def test_an_image_s_layer():
            open("/bin/big", "wb").write(b"x" * 16 * 2**20)

        @nsbox(scratch="disk", disk="8M")
        def test_within():
            open("/tmp/a", "wb").write(b"x" * 2 * 2**20)
            open("/etc/b", "wb").write(b"x" * 2 * 2**20)
        """,
        "--junitxml=junit.xml",
    )
    outcomes = result.stdout.str()
    for name in ("test_keeps_writing", "test_hides_in_a_closed_directory", "test_an_image_s_layer"):
        assert re.search(rf"FAILED test_inner.py::{name} - (Failed: )?{DISK_REACHED}", outcomes), outcomes
    # P's look may come while the test runs or during its teardown: a FAILED call, or (as for a
    # memory limit hit in teardown) a passed call and an ERROR at teardown, with the same words
    ended = re.search(rf"(FAILED|ERROR) test_inner.py::test_writes_and_ends - (Failed: )?{DISK_REACHED}", outcomes)
    assert ended, outcomes
    if ended[1] == "FAILED":
        result.assert_outcomes(passed=1, failed=4)
    else:
        result.assert_outcomes(passed=2, failed=3, errors=1)
    assert "the sandbox was killed" in outcomes
    assert "PASSED test_inner.py::test_within" in outcomes
    xml = (pytester.path / "junit.xml").read_text()
    assert xml.count('<property name="nsbox_cause" value="disk" />') == 4
    assert run_dirs(disk_base) == []


FIND_SCRATCH_CONFTEST = """
import os

def pytest_nsbox_sandbox_finished(item, spec, result):
    # in pytest's process, right after the test: where is the file it wrote to /tmp?
    found = [os.path.join(d, f) for d, _, files in os.walk(os.environ["TMPDIR"]) for f in files if f == "marker"]
    print("FOUND", found)
"""


def test_the_scratch_is_a_directory_in_tmpdir_removed_after_the_test(run_inner, disk_base: Path) -> None:
    result = run_inner(
        """
        import os
        import pytest_nsbox
        from pytest_nsbox import nsbox

        @nsbox(scratch="disk")
        def test_writes():
            os.makedirs("/tmp/locked/inner")
            open("/tmp/locked/inner/marker", "w").write("x")
            os.chmod("/tmp/locked/inner", 0)  # removed all the same
            os.chmod("/tmp/locked", 0)
            open("/tmp/marker", "w").write("x")
            pytest_nsbox.require_sandbox()  # "/" is still the sandbox's own mount
        """,
        "-s",
        conftest=FIND_SCRATCH_CONFTEST,
    )
    result.assert_outcomes(passed=1)
    found = re.search(r"FOUND \[(.*)\]", result.stdout.str())
    assert found and "/fresh/tmp/marker" in found[1] and str(disk_base) in found[1], result.stdout.str()
    user_dir = disk_base / f"{diskscratch.USER_DIR_PREFIX}{os.getuid()}"
    assert stat.S_IMODE(user_dir.stat().st_mode) == 0o700
    assert run_dirs(disk_base) == []


def test_a_killed_run_s_scratch_is_swept_at_the_next_start(pytester: pytest.Pytester, disk_base: Path) -> None:
    pytester.makepyfile(
        test_inner="""
        import os, time
        from pytest_nsbox import nsbox

        @nsbox(scratch="disk")
        def test_hangs():
            open("/tmp/marker", "wb").write(b"x" * 2**20)
            time.sleep(600)
        """
    )
    env = {**os.environ, "TMPDIR": str(disk_base)}
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_inner.py"],
        cwd=pytester.path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not any(path.name == "marker" for path in disk_base.rglob("marker")):
            assert process.poll() is None, "the inner pytest ended before its test wrote"
            time.sleep(0.05)
    finally:
        process.kill()  # SIGKILL: nothing of pytest-nsbox runs to clean up
        process.wait()
    assert len(run_dirs(disk_base)) == 1  # left behind
    pytester.makepyfile(
        test_inner="""
        from pytest_nsbox import nsbox

        @nsbox
        def test_next():  # a run that uses no disk scratch sweeps too
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert run_dirs(disk_base) == []


def test_a_bound_the_disk_cannot_hold_is_an_error(run_inner, disk_base: Path) -> None:
    free = diskscratch.free_space(str(disk_base))
    too_big = (free // 2**30 + 1) * 2**30
    result = run_inner(
        f"""
        from pytest_nsbox import nsbox

        @nsbox(scratch="disk", disk={too_big})
        def test_too_big():
            raise AssertionError("the body never runs")
        """
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [f"*disk limit of {too_big // 2**30} GiB cannot be had on disk: * free (test test_inner.py::test_too_big)*"]
    )


@pytest.mark.parametrize("where", ["tmpfs", "project"])
def test_a_scratch_directory_in_memory_or_in_sight_is_refused(
    run_inner, pytester: pytest.Pytester, monkeypatch, where: str
) -> None:
    if where == "tmpfs":
        base = "/dev/shm"
        if diskscratch.filesystem_type(base) != "tmpfs":
            pytest.skip("/dev/shm is no tmpfs here")
    else:
        base = str(pytester.path / "scratch")  # the rootdir: every sandbox sees it
        os.mkdir(base)
        if diskscratch.filesystem_type(base) in diskscratch.NO_UPPER_FILESYSTEMS:
            pytest.skip("the rootdir is on overlay here (User-Mode Linux): refused for that first")
    monkeypatch.setenv("TMPDIR", base)
    result = run_inner(
        """
        from pytest_nsbox import nsbox

        @nsbox(scratch="disk")
        def test_refused():
            raise AssertionError("the body never runs")
        """
    )
    result.assert_outcomes(errors=1)
    expected = "is a tmpfs (memory), not a disk" if where == "tmpfs" else "would be visible inside the sandbox"
    result.stdout.fnmatch_lines([f"*scratch='disk' is unavailable here: *{expected}*test_inner.py::test_refused*"])


def test_ini_and_option_choose_the_scratch_and_its_default_bound(run_inner, pytester: pytest.Pytester, disk_base: Path) -> None:
    pytester.makeini("[pytest]\nnsbox_scratch = disk\n")
    source = """
        from pytest_nsbox import nsbox

        @nsbox
        def test_default():
            pass

        @nsbox(scratch="memory")
        def test_marker():
            pass
        """
    result = run_inner(source, conftest=SCRATCH_CONFTEST)
    result.assert_outcomes(passed=2)
    text = result.stdout.str()
    assert "scratch=disk (ini)" in text
    header = re.search(r"disk=(\d+(?:\.\d)?) (MiB|GiB) \(built-in\)", text)
    assert header, text
    shown = float(header[1]) * (2**30 if header[2] == "GiB" else 2**20)
    free = diskscratch.free_space(str(disk_base))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # the inner run inherits it
    assert abs(shown - free // 2 // workers) < 0.05 * free  # half the free space of the disk, not memory
    specs = json.loads((pytester.path / "specs.json").read_text())
    assert specs == {"test_default": "disk", "test_marker": "memory"}
    run_inner(source, "--nsbox-scratch=memory", conftest=SCRATCH_CONFTEST).assert_outcomes(passed=2)
    assert json.loads((pytester.path / "specs.json").read_text())["test_default"] == "memory"
    result = run_inner(source, "--nsbox-scratch=ssd")
    result.stderr.fnmatch_lines(["*invalid scratch 'ssd' from option --nsbox-scratch*"])


SCRATCH_CONFTEST = """
import json, os

def pytest_nsbox_sandbox_finished(item, spec, result):
    specs = json.load(open("specs.json")) if os.path.exists("specs.json") else {}
    specs[item.name] = spec.scratch
    json.dump(specs, open("specs.json", "w"))
"""


def test_a_bad_scratch_value_names_the_test(run_inner) -> None:
    result = run_inner(
        """
        from pytest_nsbox import nsbox

        @nsbox(scratch="ssd")
        def test_bad():
            raise AssertionError("the body never runs")
        """
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*invalid scratch 'ssd' from nsbox marker on test_inner.py::test_bad*"])


def test_keep_copies_a_disk_scratch_out(
    run_inner, disk_base: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))  # kept runs go there
    result = run_inner(
        """
        from pytest_nsbox import nsbox

        @nsbox(scratch="disk")
        def test_changes():
            open("/tmp/t", "w").write("t")
            open("/etc/e", "w").write("e")
            open("/top", "w").write("r")  # image "host": "/" itself
            assert False
        """,
        "--nsbox-keep=failed",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*filesystem changes*"])
    text = result.stdout.str()
    for path in ("/tmp/t", "/etc/e", "/top"):
        assert re.search(rf"^A {re.escape(path)}\b", text, re.M), text
    assert run_dirs(disk_base) == []


@pytest.mark.both_build_modes
def test_files_given_to_other_ids_are_measured_and_removed(run_inner, disk_base: Path) -> None:
    """Where sandboxes map a range of ids (as root, or rootless with subordinate ids), a test may
    give its files to another id and close them (mode 000): the bound still sees what they hold,
    and the scratch is still removed."""
    result = run_inner(
        """
        import os, time
        from pytest_nsbox import nsbox

        @nsbox(scratch="disk", disk="8M")
        def test_hides_as_another_id():
            try:
                os.mkdir("/tmp/theirs")
                os.chown("/tmp/theirs", 1000, 1000)
            except OSError as exc:
                print("ONE ID", exc)  # a sandbox that maps only root: nothing to give away
            os.chmod("/tmp/theirs", 0)
            with open("/tmp/theirs/f", "wb") as handle:
                for _ in range(4096):
                    handle.write(b"x" * 2**20)
                    handle.flush()
                    time.sleep(0.001)

        @nsbox(scratch="disk")
        def test_leaves_files_of_another_id():
            os.makedirs("/tmp/a/b")
            open("/tmp/a/b/f", "w").write("x")
            for path in ("/tmp/a/b/f", "/tmp/a/b", "/tmp/a"):
                try:
                    os.chown(path, 1000, 1000)
                except OSError:
                    pass
            os.chmod("/tmp/a/b", 0o700)
            os.chmod("/tmp/a", 0o700)
        """
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([f"FAILED test_inner.py::test_hides_as_another_id - *{DISK_REACHED}*"])
    assert run_dirs(disk_base) == []
    user_dir = disk_base / f"{diskscratch.USER_DIR_PREFIX}{os.getuid()}"
    assert [p for p in user_dir.rglob("*")] == []


@pytest.mark.both_build_modes
def test_a_failed_disk_scratch_step_leaves_the_test_unrun_and_nothing_behind(
    run_inner, pytester: pytest.Pytester, disk_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(faults.FAULT_ENV, "mount_scratch_dir")
    marker = pytester.path / "shared" / "body-ran"
    result = run_inner(
        f"""
        from pytest_nsbox import nsbox

        @nsbox(scratch="disk")
        def test_body():
            open({str(marker)!r}, "w").write("the body ran")
        """,
        "--basetemp=shared",
    )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines([f"SKIPPED*step mount_scratch_dir failed*{faults.FAULT_MESSAGE}*"])
    assert not marker.exists()
    assert run_dirs(disk_base) == []
