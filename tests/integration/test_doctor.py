"""``nsbox doctor`` on this host with a project's ini and the environment; the plugin's cgroup roots
(never created for a configured name, nothing left behind) and the run's one notice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_nsbox import doctor, probe
from pytest_nsbox.box import _linux as L
from pytest_nsbox.box import cgroups
from pytest_nsbox.project import Project

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]

V1 = (cgroups.CGROUP_MOUNT / "memory" / "cgroup.procs").exists() and not (cgroups.CGROUP_MOUNT / "cgroup.controllers").exists()
needs_v1 = pytest.mark.skipif(not V1, reason="needs the cgroup v1 memory, pids and cpu hierarchies")
PR_SET_DUMPABLE = 4  # <linux/prctl.h>
NOTICE_START = "nsbox: no cgroup could be had for sandboxed tests: "


def nsbox_doctor(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != probe.CGROUP_ROOT_ENV} | env
    return subprocess.run(
        [sys.executable, "-m", "pytest_nsbox", "doctor"], capture_output=True, text=True, cwd=cwd, env=environ, timeout=120
    )


def named_dirs(name: str) -> list[Path]:
    """Every directory called *name* in any cgroup hierarchy (cgroup v1) or at the top (v2)."""
    return sorted(cgroups.CGROUP_MOUNT.glob(f"*/{name}")) + sorted(cgroups.CGROUP_MOUNT.glob(name))


@pytest.fixture
def handed_root() -> Iterator[str]:
    """A v1 cgroup root of this test's own, made as root does for a CI user (mkdir in each hierarchy)."""
    name = f"nsbox-doctor-{uuid.uuid4().hex[:10]}"
    made = [cgroups.CGROUP_MOUNT / ctrl / name for ctrl in cgroups.V1_CONTROLLERS]
    for path in made:
        path.mkdir()
    yield name
    for path in made:
        for child in path.iterdir():
            if child.is_dir():
                child.rmdir()
        path.rmdir()


INIS = {
    "pytest.ini": "[pytest]\nnsbox_cgroup_root = {root}\nnsbox_pids = 256\n",
    "pyproject.toml": '[tool.pytest.ini_options]\nnsbox_cgroup_root = "{root}"\nnsbox_pids = "256"\n',
}


@needs_v1
@pytest.mark.needs_root
@pytest.mark.parametrize("ini_name", list(INIS))
def test_doctor_reads_the_cgroup_root_from_the_ini(tmp_path: Path, handed_root: str, ini_name: str) -> None:
    (tmp_path / ini_name).write_text(INIS[ini_name].format(root=handed_root))
    missing = f"nsbox-absent-{uuid.uuid4().hex[:10]}"
    result = nsbox_doctor(tmp_path, PYTEST_NSBOX_CGROUP_ROOT=missing)  # the ini comes first
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"info  settings: ini {tmp_path / ini_name}" in lines
    assert f"info  ini nsbox_cgroup_root: '{handed_root}'" in lines
    assert f"info  cgroup root: {handed_root} (from ini nsbox_cgroup_root)" in lines
    assert f"info  env PYTEST_NSBOX_CGROUP_ROOT={missing}: ignored: the ini's nsbox_cgroup_root comes first" in lines
    assert f"info  cgroup v1: sandbox cgroups go to /sys/fs/cgroup/{{memory,pids,cpu}}/{handed_root}" in lines
    assert "ok    cgroup v1 pids (pids limits, the default pids cap (1024)): ok" in lines
    assert lines[-1] == f"ok    {doctor.OK_EXIT}"
    assert [p for p in named_dirs(handed_root)[0].iterdir() if p.is_dir()] == []  # its test cgroup is gone
    assert named_dirs(missing) == []


@needs_v1
@pytest.mark.needs_root
def test_doctor_reads_the_cgroup_root_from_the_environment(tmp_path: Path, handed_root: str) -> None:
    result = nsbox_doctor(tmp_path, PYTEST_NSBOX_CGROUP_ROOT=handed_root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"info  cgroup root: {handed_root} (from env PYTEST_NSBOX_CGROUP_ROOT)" in result.stdout.splitlines()
    assert f"info  settings: no ini file (rootdir {tmp_path})" in result.stdout.splitlines()


@needs_v1
def test_doctor_fails_on_a_configured_root_that_does_not_exist_and_creates_nothing(tmp_path: Path) -> None:
    name = f"nsbox-absent-{uuid.uuid4().hex[:10]}"
    result = nsbox_doctor(tmp_path, PYTEST_NSBOX_CGROUP_ROOT=name)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        f"FAIL  cgroup v1 memory (memory limits, the peak-memory report): the configured cgroup root "
        f"/sys/fs/cgroup/memory/{name} does not exist, and pytest-nsbox does not create it; "
        f"env PYTEST_NSBOX_CGROUP_ROOT names this root for sandbox cgroups, and no memory cgroup can be had there"
    ) in result.stdout.splitlines()
    assert f"      fix: as root, once: mkdir -p /sys/fs/cgroup/memory/{name}" in result.stdout
    assert result.stdout.splitlines()[-1] == f"FAIL  {doctor.FAIL_EXIT}"
    assert named_dirs(name) == []


@needs_v1
@pytest.mark.needs_root
def test_doctor_as_an_unprivileged_user_names_the_owner_and_the_user(tmp_path: Path, handed_root: str) -> None:
    """The handed-over root belongs to root here: the user 'nobody' (a real uid, in a forked child
    of this test) cannot use it; doctor says why and prints the chown for 'nobody'."""
    import pwd

    from pytest_nsbox.box import subids  # noqa: F401 - imported before the child loses access to /root

    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            L.prctl(PR_SET_DUMPABLE, 1)  # else /proc/self stays root's: no id maps of its own
            for cached in (probe.userns, probe.overlay_userns, probe.subordinate_ids, probe.cgroup_limits):
                cached.cache_clear()  # probed as root by this test's conftest
            found = doctor.diagnose(Project(tmp_path), {probe.CGROUP_ROOT_ENV: handed_root})
            payload = {"status": doctor.exit_status(found), "lines": [line for f in found for line in f.lines()]}
            os.write(write, json.dumps(payload).encode())
        except BaseException:  # noqa: BLE001 - the child reports anything through the pipe
            os.write(write, traceback.format_exc().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    assert text.startswith("{"), text
    payload = json.loads(text)
    lines = payload["lines"]
    assert payload["status"] == 1, "\n".join(lines)
    memory = f"/sys/fs/cgroup/memory/{handed_root}"
    assert (
        f"FAIL  cgroup v1 memory (memory limits, the peak-memory report): {memory} (owned by root) is not writable by "
        f"nobody (uid {nobody.pw_uid}); env PYTEST_NSBOX_CGROUP_ROOT names this root for sandbox cgroups, "
        "and no memory cgroup can be had there"
    ) in lines
    dirs = " ".join(f"/sys/fs/cgroup/{c}/{handed_root}" for c in ("memory", "pids", "cpu"))
    assert f"      fix: as root, once: mkdir -p {dirs} && chown -R nobody: {dirs}; then set ini nsbox_cgroup_root" in "\n".join(
        lines
    )
    assert "$USER" not in text and "ok    user namespaces: ok" in lines


NOTICE_SOURCE = """
import pytest

@pytest.mark.nsbox
@pytest.mark.parametrize("n", range(4))
def test_plain(n):
    pass

@pytest.mark.nsbox(pids=64)
def test_asks_for_a_limit():
    pass
"""


@pytest.mark.parametrize("workers", [(), ("-n", "2")])
def test_one_notice_per_run_when_no_cgroup_can_be_had(run_inner, workers: tuple[str, ...]) -> None:
    """A configured root that does not exist: the defaults are off (one notice, also with two
    workers), and a test that asks for a limit is still SKIPPED, never run without it."""
    name = f"nsbox-absent-{uuid.uuid4().hex[:10]}"
    result = run_inner(NOTICE_SOURCE, "-o", f"nsbox_cgroup_root={name}", *workers)
    result.assert_outcomes(passed=4, skipped=1)
    result.stdout.fnmatch_lines(
        ["*cannot enforce the requested limits (pids)*does not exist, and pytest-nsbox does not create it*"]
    )
    notices = [line for line in result.stdout.lines if line.startswith(NOTICE_START)]
    assert len(notices) == 1, result.stdout.str()
    assert notices[0].endswith(
        "So the default pids cap (1024) of sandboxed tests and the peak-memory report are off; "
        "`nsbox doctor` says how to get them"
    )
    assert named_dirs(name) == []


@pytest.mark.needs_cgroup_limits
def test_no_notice_when_the_defaults_apply(run_inner) -> None:
    result = run_inner(NOTICE_SOURCE, "-n", "2")
    result.assert_outcomes(passed=5)
    assert not [line for line in result.stdout.lines if line.startswith(NOTICE_START)]


@needs_v1
@pytest.mark.needs_root
def test_env_naming_a_new_root_leaves_no_cgroup_behind(run_inner, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"nsbox-new-{uuid.uuid4().hex[:10]}"
    before = {p.name for p in cgroups.CGROUP_MOUNT.glob("*/*") if p.is_dir()}
    monkeypatch.setenv(probe.CGROUP_ROOT_ENV, name)
    result = run_inner(NOTICE_SOURCE, "-n", "2")
    result.assert_outcomes(passed=4, skipped=1)
    assert named_dirs(name) == []
    after = {p.name for p in cgroups.CGROUP_MOUNT.glob("*/*") if p.is_dir()}
    assert name not in after and not {n for n in after - before if n.startswith("nsbox-new-")}
