"""--nsbox-keep: a failed test's writable layer is kept, its changes reported; nsbox diff, export, shell --kept."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import junit_cases
from oci_writer import Entry, host_shell_entries, layer_tar, write_layout

from pytest_nsbox import kept

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]

FAILING = """
import os, shutil, socket, pytest

@pytest.mark.nsbox(image={image!r})
def test_fails():
    socket.socket(socket.AF_UNIX).bind("/run/test.sock")  # not kept, and said so
    open("/tmp/out.txt", "w").write("hello from the failed test\\n")
    with open("/etc/hostname", "a") as handle:   # the init layer's file
        handle.write("changed\\n")
    os.remove("/usr/share/tiny/data.txt")          # the image's: a whiteout
    os.chmod("/etc/os-release", 0o600)             # mode only: a change
    os.makedirs("/srv/new/deeper")
    assert False, "boom"

@pytest.mark.nsbox(image={image!r})
def test_passes():
    open("/tmp/passed.txt", "w").write("x")
"""

HOST_FAILING = """
import pytest

@pytest.mark.nsbox
def test_fails():
    open("/tmp/out.txt", "w").write("written by the failed test\\n")
    assert False
"""


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Kept runs go to $XDG_CACHE_HOME/pytest-nsbox/kept: one of this test's own."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def nsbox(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "pytest_nsbox", *args], cwd)


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)


def kept_command(output: str, nodeid: str) -> list[str]:
    """The command the run printed after its short summary to re-enter *nodeid*'s sandbox."""
    match = re.search(rf"^nsbox: kept {re.escape(nodeid)}: (.*)$", output, re.M)
    assert match, output
    return shlex.split(match.group(1))


def run_dirs(cache: Path) -> list[Path]:
    return sorted((cache / "pytest-nsbox" / kept.KEPT_DIR).glob("*/run-*"))


def test_a_failed_test_is_kept_and_its_changes_reported(
    run_inner, pytester: pytest.Pytester, tiny_image: Path, own_cache: Path
) -> None:
    result = run_inner(FAILING.format(image=str(tiny_image)), "--nsbox-keep=failed", "--junitxml=junit.xml")
    result.assert_outcomes(failed=1, passed=1)
    output = result.stdout.str()
    assert re.search(r"^nsbox: .*; keep failed \(newest 3 runs, 2 GiB: .*/kept/", output, re.M), output
    assert kept.CHANGES_SECTION in output
    for line in (
        "A /tmp/out.txt (file, 27 B)",
        "C /etc/hostname (file, 14 B)",
        "D /usr/share/tiny/data.txt (file,",
        "C /etc/os-release (file,",
        "A /srv (dir)",
        "A /srv/new/deeper (dir)",
        "+hello from the failed test",
        "+changed",
        "not kept (sockets, device nodes, unreadable files): /run/test.sock",
    ):
        assert line in output, line
    assert "/tmp/passed.txt" not in output  # the passed test is not kept
    command = kept_command(output, "test_inner.py::test_fails")
    assert command[-3:] == ["shell", "--kept", "test_inner.py::test_fails"]
    assert output.index("short test summary info") < output.index("nsbox: kept test_inner.py::test_fails")
    case = junit_cases(pytester.path / "junit.xml")["test_fails"]
    assert kept.CHANGES_SECTION in case.text and "A /tmp/out.txt" in case.text
    assert case.properties[kept.KEPT_COMMAND_PROPERTY] == shlex.join(command)
    assert Path(case.properties[kept.KEPT_PROPERTY], kept.LAYER_FILE).is_file()
    [run] = run_dirs(own_cache)
    assert [p.name for p in run.iterdir() if p.is_dir()] == [kept.test_dir_name("test_inner.py::test_fails")]
    meta = json.loads((run / kept.test_dir_name("test_inner.py::test_fails") / kept.META_FILE).read_text())
    assert meta["nodeid"] == "test_inner.py::test_fails" and meta["outcome"] == "failed"
    assert meta["image_root"] == str(tiny_image) and meta["network"] == "none" and meta["hostname"] == "nsbox"
    assert meta["cwd"] == str(pytester.path) and "PATH" in meta["environment"]
    missing = nsbox("diff", "test_inner.py::test_passes", cwd=pytester.path)
    assert missing.returncode == 2 and "no kept sandbox of 'test_inner.py::test_passes'" in missing.stderr
    assert "test_inner.py::test_fails" in missing.stderr  # the kept ones are listed


def test_diff_prints_the_changes_later_and_as_json(run_inner, pytester: pytest.Pytester, tiny_image: Path) -> None:
    run_inner(FAILING.format(image=str(tiny_image)), "--nsbox-keep=failed").assert_outcomes(failed=1, passed=1)
    shown = nsbox("diff", "test_inner.py::test_fails", cwd=pytester.path)
    assert shown.returncode == 0, shown.stderr
    assert "A /tmp/out.txt" in shown.stdout and "D /usr/share/tiny/data.txt" in shown.stdout
    assert "+++ kept:/tmp/out.txt" in shown.stdout
    data = json.loads(nsbox("diff", "test_inner.py::test_fails", "--json", cwd=pytester.path).stdout)
    assert data["nodeid"] == "test_inner.py::test_fails" and data["outcome"] == "failed"
    changes = {(c["kind"], c["path"]) for c in data["changes"]}
    assert {("A", "/tmp/out.txt"), ("C", "/etc/hostname"), ("D", "/usr/share/tiny/data.txt")} <= changes
    assert "/tmp/out.txt" in data["diffs"]


def test_an_opaque_directory_is_a_deletion_of_what_was_below(run_inner, pytester: pytest.Pytester, tiny_image: Path) -> None:
    source = f"""
import os, shutil, pytest

@pytest.mark.nsbox(image={str(tiny_image)!r})
def test_fails():
    shutil.rmtree("/usr/share/tiny")
    os.mkdir("/usr/share/tiny")
    open("/usr/share/tiny/new.txt", "w").write("new")
    assert False
"""
    run_inner(source, "--nsbox-keep=failed").assert_outcomes(failed=1)
    data = json.loads(nsbox("diff", "test_inner.py::test_fails", "--json", cwd=pytester.path).stdout)
    changes = {(c["kind"], c["path"]) for c in data["changes"]}
    assert ("D", "/usr/share/tiny/data.txt") in changes and ("A", "/usr/share/tiny/new.txt") in changes, changes


def test_the_printed_command_re_enters_the_kept_sandbox(run_inner, pytester: pytest.Pytester) -> None:
    result = run_inner(HOST_FAILING, "--nsbox-keep=failed")
    result.assert_outcomes(failed=1)
    command = kept_command(result.stdout.str(), "test_inner.py::test_fails")
    entered = run([*command, "--", "cat", "/tmp/out.txt"], pytester.path)
    assert entered.returncode == 0, entered.stderr
    assert entered.stdout == "written by the failed test\n"
    # copy-on-write: what a shell writes is thrown away, the kept layer stays as the test left it
    write = [*command, "--", "sh", "-c", "echo overwritten > /tmp/out.txt; rm -f /tmp/out.txt; pwd; hostname"]
    again = run(write, pytester.path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == [str(pytester.path), "nsbox"]  # the test's cwd and hostname
    reread = run([*command, "--", "cat", "/tmp/out.txt"], pytester.path)
    assert reread.stdout == "written by the failed test\n"


def test_shell_kept_has_the_tests_environment_and_exit_status(
    run_inner, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NSBOX_KEEP_PROBE", "from-the-run")
    monkeypatch.setenv("NSBOX_KEEP_TOKEN", "secret")
    pytester.makeini("[pytest]\nnsbox_drop_env = NSBOX_KEEP_TOKEN\n")
    run_inner(HOST_FAILING, "--nsbox-keep=failed").assert_outcomes(failed=1)
    monkeypatch.delenv("NSBOX_KEEP_PROBE")
    script = 'echo "${NSBOX_KEEP_PROBE}:${NSBOX_KEEP_TOKEN:-dropped}"; exit 7'
    shell = nsbox("shell", "--kept", "test_inner.py::test_fails", "--", "sh", "-c", script, cwd=pytester.path)
    assert shell.returncode == 7 and shell.stdout == "from-the-run:dropped\n", shell.stderr
    unknown = nsbox("shell", "--kept", "test_inner.py::test_nothing", cwd=pytester.path)
    assert unknown.returncode == 2 and "no kept sandbox of 'test_inner.py::test_nothing'" in unknown.stderr


def test_export_writes_an_oci_layer_that_imports(run_inner, pytester: pytest.Pytester, tiny_image: Path, tmp_path: Path) -> None:
    run_inner(FAILING.format(image=str(tiny_image)), "--nsbox-keep=failed").assert_outcomes(failed=1, passed=1)
    layer = tmp_path / "layer.tar"
    exported = nsbox("export", "test_inner.py::test_fails", "-o", str(layer), cwd=pytester.path)
    assert exported.returncode == 0, exported.stderr
    with tarfile.open(layer) as archive:
        names = {m.name: m for m in archive.getmembers()}
    assert "usr/share/tiny/.wh.data.txt" in names and names["tmp/out.txt"].isfile()
    assert names["etc/os-release"].mode == 0o600
    assert all(not m.isdev() for m in names.values())  # whiteouts are .wh. files, never device nodes
    # as a layer of an OCI image, over a base that has the file it deletes
    base = layer_tar([Entry("usr/share/tiny", kind="dir", mode=0o755), Entry("usr/share/tiny/data.txt", content=b"x")])
    write_layout(tmp_path / "layout", [base, layer.read_bytes()])
    cache = tmp_path / "image-cache"
    imported = nsbox("images", "--cache-dir", str(cache), "import", f"oci:{tmp_path / 'layout'}", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    whiteouts = [p for p in cache.rglob(".wh.*")]
    assert not whiteouts  # the importer turned the .wh. member into an overlay whiteout
    devices = [p for p in (cache / "layers").rglob("data.txt") if p.is_char_device()]
    assert devices, list((cache / "layers").rglob("*"))


def test_keep_all_and_the_newest_runs(run_inner, pytester: pytest.Pytester, own_cache: Path) -> None:
    source = """
import pytest

@pytest.mark.nsbox
def test_passes():
    open("/tmp/passed.txt", "w").write("x")
"""
    result = run_inner(source, "--nsbox-keep=all")
    result.assert_outcomes(passed=1)
    assert "A /tmp/passed.txt (file, 1 B)" in result.stdout.str()  # a passed test's section: -rA shows it
    for _ in range(2):
        run_inner(source, "--nsbox-keep=all", "--nsbox-keep-runs=2").assert_outcomes(passed=1)
    assert len(run_dirs(own_cache)) == 2
    run_inner(source, "--nsbox-keep=none").assert_outcomes(passed=1)
    run_inner(source).assert_outcomes(passed=1)
    assert len(run_dirs(own_cache)) == 2  # runs that keep nothing create and prune nothing


def test_a_layer_over_the_size_cap_is_not_kept(run_inner, pytester: pytest.Pytester, own_cache: Path) -> None:
    source = """
import pytest

@pytest.mark.nsbox
def test_fails():
    open("/tmp/big", "wb").write(b"x" * (3 * 2**20))
    assert False
"""
    result = run_inner(source, "--nsbox-keep=failed", "--nsbox-keep-size=1M")
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    assert "test_inner.py::test_fails failed but its sandbox was not kept" in output
    assert "larger than nsbox_keep_size (1 MiB)" in output
    assert not [p for run in run_dirs(own_cache) for p in run.iterdir() if p.is_dir()]


def test_a_timed_out_test_is_kept(run_inner, pytester: pytest.Pytester) -> None:
    source = """
import time, pytest

@pytest.mark.nsbox(timeout=2)
def test_hangs():
    open("/tmp/progress.txt", "w").write("got this far\\n")
    time.sleep(60)
"""
    result = run_inner(source, "--nsbox-keep=failed")
    result.assert_outcomes(failed=1)
    assert "timed out after" in result.stdout.str() and "A /tmp/progress.txt" in result.stdout.str()
    command = kept_command(result.stdout.str(), "test_inner.py::test_hangs")
    entered = run([*command, "--", "cat", "/tmp/progress.txt"], pytester.path)
    assert entered.stdout == "got this far\n", entered.stderr


@pytest.mark.parametrize("build_mode", ["forked"])
def test_the_forked_form_says_not_kept(run_inner, pytester: pytest.Pytester) -> None:
    result = run_inner(HOST_FAILING, "--nsbox-keep=failed")
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    assert "test_inner.py::test_fails failed but its sandbox was not kept" in output
    assert kept.FORKED_NOT_KEPT in output and "nsbox: kept " not in output


def test_xdist_workers_keep_into_one_run(run_inner, pytester: pytest.Pytester, own_cache: Path) -> None:
    source = """
import pytest

@pytest.mark.nsbox
@pytest.mark.parametrize("n", range(4))
def test_fails(n):
    open(f"/tmp/out-{n}", "w").write(str(n))
    assert False
"""
    result = run_inner(source, "--nsbox-keep=failed", "-n", "2")
    result.assert_outcomes(failed=4)
    for n in range(4):
        assert f"nsbox: kept test_inner.py::test_fails[{n}]: " in result.stdout.str()
    [run] = run_dirs(own_cache)
    assert len([p for p in run.iterdir() if p.is_dir()]) == 4


@pytest.mark.parametrize(
    ("args", "ini", "message"),
    [
        (("--nsbox-keep-runs=0",), "", "invalid number of kept runs '0' from option --nsbox-keep-runs"),
        (("--nsbox-keep-size=lots",), "", "invalid size of kept layers 'lots' from option --nsbox-keep-size"),
        ((), "nsbox_keep = sometimes", "invalid keep mode 'sometimes' from ini nsbox_keep (expected failed, all or none)"),
    ],
)
def test_bad_keep_settings_are_usage_errors(
    run_inner, pytester: pytest.Pytester, args: tuple[str, ...], ini: str, message: str
) -> None:
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    result = run_inner(HOST_FAILING, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_kept_files_are_private(run_inner, pytester: pytest.Pytester, own_cache: Path) -> None:
    run_inner(HOST_FAILING, "--nsbox-keep=failed").assert_outcomes(failed=1)
    [run] = run_dirs(own_cache)
    assert os.stat(run).st_mode & 0o077 == 0
    [test_dir] = [p for p in run.iterdir() if p.is_dir()]
    assert os.stat(test_dir / kept.META_FILE).st_mode & 0o077 == 0  # it holds the test's environment


@pytest.mark.needs_cgroup_limits
def test_a_test_killed_by_its_memory_limit_is_kept_where_its_init_survives(run_inner, pytester: pytest.Pytester) -> None:
    """cgroup v1 kills the largest process; v2 (memory.oom.group) the whole sandbox, its PID 1 too,
    and with it the writable layer: then the test says it was not kept, and why."""
    source = """
import pytest

@pytest.mark.nsbox(memory="64M")
def test_hog():
    open("/tmp/before-oom.txt", "w").write("written before the OOM kill\\n")
    hog = bytearray(1 << 30)
"""
    result = run_inner(source, "--nsbox-keep=failed")
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    assert "memory limit" in output
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # cgroup v2
        assert "test_inner.py::test_hog failed but its sandbox was not kept: copying its writable layer failed" in output
        return
    command = kept_command(output, "test_inner.py::test_hog")
    entered = run([*command, "--", "cat", "/tmp/before-oom.txt"], pytester.path)
    assert entered.stdout == "written before the OOM kill\n", entered.stderr


def test_shell_kept_on_an_imported_image(run_inner, pytester: pytest.Pytester, tmp_path: Path) -> None:
    """The kept layer goes over the image's layers; the image's Env was the test's, and is the shell's."""
    entries = [*host_shell_entries(), Entry("data", "dir", mode=0o755), Entry("data/original.txt", content=b"o\n")]
    write_layout(tmp_path / "layout", [layer_tar(entries)], config={"Env": ["PATH=/bin", "GREETING=from the image"]})
    source = f"""
import os, pytest

@pytest.mark.nsbox(image="oci:{tmp_path / "layout"}")
def test_fails():
    os.remove("/data/original.txt")
    open("/data/new.txt", "w").write("new line\\n")
    assert False
"""
    run_inner(source, "--nsbox-keep=failed").assert_outcomes(failed=1)
    script = 'read l < /data/new.txt; echo "$l"; [ -e /data/original.txt ] && echo still || echo gone; echo "$GREETING"'
    shell = nsbox("shell", "--kept", "test_inner.py::test_fails", "--", "/bin/sh", "-c", script, cwd=pytester.path)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.splitlines() == ["new line", "gone", "from the image"]


def test_shell_needs_an_image_or_kept(tmp_path: Path) -> None:
    result = nsbox("shell", cwd=tmp_path)
    assert result.returncode == 2 and "nsbox: shell needs an IMAGE (or --kept NODEID)" in result.stderr
    nothing = nsbox("diff", "t.py::test_x", cwd=tmp_path)
    assert nothing.returncode == 2 and "no kept sandbox of 't.py::test_x'" in nothing.stderr
    assert "kept tests: none" in nothing.stderr
