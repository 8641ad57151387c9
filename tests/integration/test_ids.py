"""Ids and groups inside a sandbox (issue 14, items 1 and 2): a full range is mapped (as root, or
rootless with subordinate ids), so ownership, setgroups, initgroups, Popen(user=, group=) and
tarfile behave as on the host; what a test gives to other ids in basetemp is nobody's on the
host (root) or given back to the user (rootless); without subordinate ids, one id, as documented."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import BUILD_MODES

from pytest_nsbox.box import subids

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]

LIKE_THE_HOST = """
import grp, io, os, pwd, stat, subprocess, sys, tarfile
import pytest

@pytest.mark.nsbox
def test_a_full_range_is_mapped():
    for name in ("uid_map", "gid_map"):
        lines = [[int(f) for f in line.split()] for line in open(f"/proc/self/{name}")]
        inside = sorted((first, count) for first, _, count in lines)
        assert inside == [(0, 1), (1, 65536)], (name, lines)  # ids 0..65536 inside
    assert open("/proc/self/setgroups").read().strip() == "allow"

@pytest.mark.nsbox
def test_chown_to_other_ids(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")
    os.chown(path, 1000, 1001)
    assert (path.stat().st_uid, path.stat().st_gid) == (1000, 1001)
    os.chown(path, 65534, 65534)  # nobody, too
    assert path.stat().st_uid == 65534

@pytest.mark.nsbox
def test_setgroups_and_initgroups_as_on_the_host():
    os.setgroups([0])
    assert os.getgroups() == [0]
    os.setgroups([0, 5, 1000])
    assert sorted(os.getgroups()) == [0, 5, 1000]
    os.setgroups([])
    assert os.getgroups() == []
    os.initgroups("root", 0)
    expected = {0} | {g.gr_gid for g in grp.getgrall() if "root" in g.gr_mem}
    assert set(os.getgroups()) == expected

@pytest.mark.nsbox
def test_popen_as_another_user_and_group():
    script = "id -u; id -g; id -G; touch /tmp/by-1"
    out = subprocess.run(
        ["/bin/sh", "-c", script], user=1, group=1, extra_groups=[2], cwd="/tmp", capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["1", "1", "1", "2"]
    assert os.stat("/tmp/by-1").st_uid == 1
    out = subprocess.run(["id", "-u"], user=1000, group=1000, cwd="/tmp", capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1000"

@pytest.mark.nsbox
def test_tarfile_extraction_as_root_keeps_owners_modes_and_mtimes(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind, mode, uid in (("d", tarfile.DIRTYPE, 0o700, 1000), ("d/f", tarfile.REGTYPE, 0o640, 1)):
            member = tarfile.TarInfo(name)
            member.type, member.mode, member.uid, member.gid, member.mtime = kind, mode, uid, uid, 1_000_000_000
            tar.addfile(member, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as tar:
        # as root: chown each member, then its mode and mtime (the filter exists from Python 3.11.4 on)
        tar.extractall(tmp_path / "out", **({"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}))
    for name, mode, uid in (("d", 0o700, 1000), ("d/f", 0o640, 1)):
        st = os.stat(tmp_path / "out" / name)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (mode, uid, uid, 1_000_000_000), name
"""


@pytest.mark.needs_subuid
@pytest.mark.both_build_modes
def test_ids_groups_and_tarfile_behave_as_on_the_host(run_inner) -> None:
    """As root, or rootless with subordinate ids: ids 0-65536 are mapped and setgroups allowed."""
    result = run_inner(LIKE_THE_HOST)
    result.assert_outcomes(passed=5)


GIVES_AWAY = """
import os
import pytest

@pytest.mark.nsbox
def test_gives_files_to_other_ids(tmp_path, request):
    (tmp_path / "to-1000").write_text("x")
    os.chown(tmp_path / "to-1000", 1000, 1000)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "inner").write_text("y")
    (private / "inner-dir").mkdir()
    (private / "inner-dir" / "deep").write_text("z")
    for path in (private / "inner-dir" / "deep", private / "inner-dir", private / "inner", private):
        os.chown(path, 5, 5)
    shared = request.config.rootpath / "shared.txt"
    os.chown(shared, 1000, 1000)  # the rootdir is an overlay: the host's file keeps its owner
    assert shared.stat().st_uid == 1000
"""


def _owners(top: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(top)): (p.lstat().st_uid, p.lstat().st_gid) for p in [top, *top.rglob("*")]}


@pytest.mark.needs_root
@pytest.mark.both_build_modes
def test_ids_given_away_as_root_are_no_host_users(run_inner, pytester: pytest.Pytester) -> None:
    """As root, inside id N (N >= 1) is 2130000000 + N on the host: a file a test gives to uid 1000
    in basetemp is nobody's, not host user 1000's; root deletes basetemp as always."""
    pytester.path.joinpath("shared.txt").write_text("host")
    result = run_inner(GIVES_AWAY)
    result.assert_outcomes(passed=1)
    assert pytester.path.joinpath("shared.txt").stat().st_uid == os.getuid()
    (given,) = pytester.path.rglob("to-1000")
    top = given.parent
    owners = _owners(top)
    first = subids.SANDBOX_FIRST_ID - 1
    assert owners["to-1000"] == (first + 1000, first + 1000)
    assert owners["private"] == owners["private/inner-dir/deep"] == (first + 5, first + 5)
    for uid, gid in owners.values():
        if uid != 0:
            with pytest.raises(KeyError):
                pwd.getpwuid(uid)
            with pytest.raises(KeyError):
                grp.getgrgid(gid)
    shutil.rmtree(top)


@pytest.mark.needs_nonroot
@pytest.mark.needs_subuid
@pytest.mark.both_build_modes
def test_rootless_basetemp_is_given_back_and_deletable(run_inner, pytester: pytest.Pytester) -> None:
    """Rootless, files a test gives to subordinate ids (a 0700 directory of uid 5 with files in it)
    would resist deletion by the user: at the session's end they are given back to the user."""
    pytester.path.joinpath("shared.txt").write_text("host")
    result = run_inner(GIVES_AWAY)
    result.assert_outcomes(passed=1)
    assert "could not give" not in result.stdout.str()
    assert pytester.path.joinpath("shared.txt").stat().st_uid == os.getuid()
    (given,) = pytester.path.rglob("to-1000")
    top = given.parent
    owners = _owners(top)
    assert set(owners.values()) == {(os.getuid(), os.getgid())}, owners
    assert stat.S_IMODE((top / "private").stat().st_mode) == 0o700  # modes kept
    shutil.rmtree(top)


@pytest.mark.needs_subuid
@pytest.mark.parametrize("build_mode", list(BUILD_MODES))
def test_pytest_removes_old_basetemps_and_failed_policy_dirs(build_mode: str, tmp_path: Path) -> None:
    """pytest's own cleanup still works when tests gave files to other ids: of the numbered
    basetemps it keeps the last 3 and deletes older ones, and with tmp_path_retention_policy=failed
    it deletes a passed test's directory (inside the sandbox) and the whole basetemp of a run that
    passed."""
    temproot = tmp_path / "temproot"
    temproot.mkdir()
    (tmp_path / "shared.txt").write_text("host")
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(GIVES_AWAY))
    env = {**os.environ, "PYTEST_DEBUG_TEMPROOT": str(temproot)}
    for policy in ("all", "all", "all", "all", "failed"):
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", f"tmp_path_retention_policy={policy}"]
        command += [*BUILD_MODES[build_mode], "test_inner.py"]
        run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
    (user_root,) = temproot.iterdir()  # pytest-of-<user>
    kept = sorted(p.name for p in user_root.iterdir() if not p.name.endswith("current"))
    # pytest-0 deleted as too old, pytest-4 (all passed, policy "failed") as a whole; no garbage-* left
    assert kept == ["pytest-1", "pytest-2", "pytest-3"]


SINGLE_ID = """
import errno, os
import pytest

@pytest.mark.nsbox
def test_one_id():
    inside, _outside, count = open("/proc/self/uid_map").read().split()
    assert (inside, count) == ("0", "1")
    open("/tmp/f", "w").close()
    with pytest.raises(OSError) as caught:
        os.chown("/tmp/f", 1000, 1000)
    assert caught.value.errno == errno.EINVAL  # uid 1000 has no mapping
    assert open("/proc/self/setgroups").read().strip() == "deny"
    with pytest.raises(PermissionError):
        os.setgroups([0])
"""


@pytest.mark.needs_nonroot
@pytest.mark.both_build_modes
def test_rootless_without_subordinate_ids_maps_one_id_and_says_so(run_inner, monkeypatch, tmp_path: Path) -> None:
    """No newuidmap (here: not in PATH): one id, as the README's "What is different" says, and the
    header says why."""
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    result = run_inner(SINGLE_ID)
    result.assert_outcomes(passed=1)
    header = "nsbox: rootless*; one id mapped (root inside = you): newuidmap and newgidmap not found in PATH*"
    result.stdout.fnmatch_lines([header])
