"""The filesystem rule: the rootdir and the current directory are throwaway writable overlays,
wherever they live and whatever the image; /tmp and /var/tmp are fresh; rootless, the rest of
the host's tree is read-only (never EOVERFLOW)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]

BUILD_MODES = {"prebuilt": (), "forked": ("-o", "nsbox_prebuild=false")}  # as tests/conftest.py's
TINY_IMAGE = Path(__file__).resolve().parents[1] / "images" / "tiny"

FSTYPE_OF = '''
def fstype_of(path):
    """The filesystem type of the mount holding *path* (longest mount point in mountinfo)."""
    target, best, best_type = os.path.realpath(path), "", ""
    for line in open("/proc/self/mountinfo"):
        before, _, after = line.partition(" - ")
        point = before.split()[4].encode().decode("unicode_escape")
        if (target + "/").startswith(point.rstrip("/") + "/") and len(point) >= len(best):
            best, best_type = point, after.split()[0]
    return best_type
'''

WRITE_IN_ROOTDIR = (
    """
import os, pathlib, pytest
from pytest_nsbox import nsbox
"""
    + FSTYPE_OF
    + """
def write_everywhere(root, cwd):
    assert os.getcwd() == cwd
    for path in (root, root / "sub", pathlib.Path(cwd)):
        assert fstype_of(path) == "overlay", path
    (root / "new.txt").write_text("new")
    (root / "sub" / "new.txt").write_text("new in sub")
    (root / "existing.txt").write_text("changed")
    (pathlib.Path(cwd) / "in-cwd.txt").write_text("cwd")
    assert (root / "new.txt").read_text() == "new"
    assert (root / "sub" / "new.txt").read_text() == "new in sub"
    assert (root / "existing.txt").read_text() == "changed"
    assert (pathlib.Path(cwd) / "in-cwd.txt").read_text() == "cwd"

@nsbox
def test_host_image(request):
    write_everywhere(request.config.rootpath, CWD)

@nsbox(image=TINY)
def test_other_image(request):
    assert "nsbox-tiny" in open("/etc/os-release").read()
    write_everywhere(request.config.rootpath, CWD)

@nsbox
def test_tmp_path_survives(tmp_path):
    (tmp_path / "kept.txt").write_text("kept")
"""
)


def _project(where: Path) -> Path:
    """A project with a pytest.ini, an existing file and a subdirectory, in a new dir under *where*."""
    project = Path(tempfile.mkdtemp(prefix="nsbox-rule-", dir=where))
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "existing.txt").write_text("original")
    (project / "sub").mkdir()
    return project


def _run(project: Path, cwd: Path, build_mode: str, basetemp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the inner pytest in *cwd* on *project*'s tests (with the ``pytest`` command's sys.path)."""
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", f"--basetemp={basetemp}"]
    command += [*BUILD_MODES[build_mode], f"--rootdir={project}", "-c", str(project / "pytest.ini"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def _assert_host_untouched(project: Path, cwd: Path) -> None:
    assert not (project / "new.txt").exists()
    assert not (project / "sub" / "new.txt").exists()
    assert (project / "existing.txt").read_text() == "original"
    assert not (cwd / "in-cwd.txt").exists()
    assert sorted(p.name for p in (project / "sub").iterdir()) == []


@pytest.fixture(params=["tmp", "home", "var-tmp"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """Where the project lives: under /tmp (pytest's tmp_path), a home directory, /var/tmp."""
    if request.param == "tmp":
        yield tmp_path
        return
    parent = Path(pwd.getpwuid(os.getuid()).pw_dir) if request.param == "home" else Path("/var/tmp")
    where = Path(tempfile.mkdtemp(prefix=".nsbox-rule-", dir=parent))
    yield where
    shutil.rmtree(where)


@pytest.mark.parametrize("build_mode", list(BUILD_MODES))
def test_rootdir_is_a_throwaway_overlay_wherever_it_lives(location: Path, build_mode: str, tmp_path: Path) -> None:
    project = _project(location)
    source = WRITE_IN_ROOTDIR.replace("CWD", repr(str(project))).replace("TINY", repr(str(TINY_IMAGE)))
    (project / "test_inner.py").write_text(source)
    result = _run(project, project, build_mode, tmp_path / "basetemp", str(project / "test_inner.py"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    _assert_host_untouched(project, project)
    assert (tmp_path / "basetemp" / "test_tmp_path_survives0" / "kept.txt").read_text() == "kept"


@pytest.mark.parametrize("build_mode", list(BUILD_MODES))
def test_the_cwd_is_a_throwaway_overlay_when_it_is_not_the_rootdir(build_mode: str, tmp_path: Path) -> None:
    """`pytest proj/...` from a directory outside the rootdir, under /tmp: the test runs in it."""
    project = _project(tmp_path)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    source = WRITE_IN_ROOTDIR.replace("CWD", repr(str(cwd))).replace("TINY", repr(str(TINY_IMAGE)))
    (project / "test_inner.py").write_text(source)
    result = _run(project, cwd, build_mode, tmp_path / "basetemp", str(project / "test_inner.py"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    _assert_host_untouched(project, cwd)


FRESH_VAR_TMP = """
import errno, os, pytest
from pytest_nsbox import nsbox

@nsbox
def test_var_tmp_is_fresh():
    assert not os.path.exists(HOST_FILE)
    open("/var/tmp/written-inside", "w").write("x")
"""


BIND_MOUNTED_ROOTDIR = """
import os, pathlib, pytest
from pytest_nsbox import nsbox

@nsbox
def test_write():
    root = pathlib.Path(os.getcwd())
    for directory in (root, root / "sub", root / "data"):
        (directory / "new.txt").write_text("new")
    assert (root / "data" / "on-tmpfs.txt").read_text() == "tmpfs"
    (root / "data" / "on-tmpfs.txt").write_text("changed")
    assert (root / "existing.txt").read_text() == "original"  # a file beside a mount point: read-only
"""


@pytest.mark.needs_root  # makes mounts, in a mount namespace of its own
@pytest.mark.parametrize("build_mode", list(BUILD_MODES))
def test_rootdir_that_is_a_bind_mount_with_a_mount_below(build_mode: str, tmp_path: Path) -> None:
    project = _project(tmp_path)
    (project / "data").mkdir()
    (project / "test_inner.py").write_text(BIND_MOUNTED_ROOTDIR)
    point = tmp_path / "checkout"  # where the project is bind-mounted, as in a container
    point.mkdir()
    pytest_command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", f"--basetemp={tmp_path / 'bt'}"]
    script = (
        f"mount --bind {project} {point} && mount -t tmpfs nsbox-test {point}/data"
        f" && echo -n tmpfs > {point}/data/on-tmpfs.txt && cd {point}"
        f" && {' '.join([*pytest_command, *BUILD_MODES[build_mode]])}"
        f" && test ! -e new.txt && test ! -e sub/new.txt && test ! -e data/new.txt && test $(cat data/on-tmpfs.txt) = tmpfs"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_var_tmp_is_fresh(run_inner) -> None:
    with tempfile.NamedTemporaryFile(dir="/var/tmp", prefix="nsbox-host-") as host_file:
        result = run_inner(FRESH_VAR_TMP.replace("HOST_FILE", repr(host_file.name)))
        result.assert_outcomes(passed=1)
    assert not Path("/var/tmp/written-inside").exists()


ROOTLESS_WRITES = """
import errno, os, pytest
from pytest_nsbox import nsbox

@nsbox
def test_what_a_rootless_sandbox_can_write(request):
    for directory in (str(request.config.rootpath), HOME, "/tmp", "/var/tmp", "/dev/shm"):
        os.makedirs(os.path.join(directory, "nsbox-TOKEN", "sub"))
        open(os.path.join(directory, "nsbox-TOKEN", "sub", "file"), "w").write("x")
    assert os.stat("/usr/share").st_uid == 65534  # root's, not mapped: nobody
    for path in ("/usr/share/nsbox-TOKEN", "/etc/apt/nsbox-TOKEN"):
        with pytest.raises(OSError) as exc:
            open(path, "w").write("x")
        assert exc.value.errno == errno.EACCES, path
"""


@pytest.mark.needs_nonroot
@pytest.mark.both_build_modes
def test_rootless_sandbox_writes_by_the_rule(run_inner) -> None:
    """Rootless, image="host": the rootdir, the home directory and the fresh directories are
    writable (/var/tmp used to fail with EOVERFLOW); other users' directories are not (EACCES)."""
    token = uuid.uuid4().hex
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    result = run_inner(ROOTLESS_WRITES.replace("TOKEN", token).replace("HOME", repr(str(home))))
    result.assert_outcomes(passed=1)
    assert not (home / f"nsbox-{token}").exists()
    assert not Path(f"/var/tmp/nsbox-{token}").exists()


def test_demo_canary_check_holds_for_a_clone_under_tmp(tmp_path: Path) -> None:
    """The demo (examples/) from a checkout under /tmp: its rootdir is an overlay inside."""
    examples = Path(__file__).resolve().parents[2] / "examples"
    clone = tmp_path / "clone"
    shutil.copytree(examples, clone / "examples")
    (clone / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", f"--basetemp={tmp_path / 'bt'}", "examples"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


IMPORTS_FROM_CWD = """
import os, sys
import pytest

@pytest.mark.nsbox
def test_sys_path_into_the_cwd():
    assert os.getcwd() == CWD
    assert "" in sys.path or CWD in sys.path  # python -m pytest puts the cwd on sys.path
    import localmod  # found through sys.path's entry for the cwd, inside the sandbox
    assert localmod.VALUE == 42
    with open("in-cwd.txt", "w") as handle:  # a throwaway overlay: writable, discarded
        handle.write("x")
    with open("localmod.py", "a") as handle:
        handle.write("# changed inside")
"""


@pytest.mark.parametrize("build_mode", list(BUILD_MODES))
def test_sys_path_entries_into_the_cwd_work_under_tmp(build_mode: str, tmp_path: Path) -> None:
    """`python -m pytest` from a cwd under /tmp outside the rootdir: the cwd is on sys.path, its
    modules import, it is writable inside, and nothing written there reaches the host."""
    project = _project(tmp_path)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    (cwd / "localmod.py").write_text("VALUE = 42\n")
    (project / "test_inner.py").write_text(IMPORTS_FROM_CWD.replace("CWD", repr(str(cwd))))
    result = _run(project, cwd, build_mode, tmp_path / "basetemp", str(project / "test_inner.py"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (cwd / "localmod.py").read_text() == "VALUE = 42\n" and not (cwd / "in-cwd.txt").exists()
