"""A disk scratch's directories, usage and removal, on the real filesystem (box/diskscratch.py)."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

import pytest

from pytest_nsbox.box import diskscratch


def test_usage_counts_allocated_blocks_once_per_inode(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_bytes(b"x" * 2**20)
    os.link(tmp_path / "d" / "e" / "f", tmp_path / "g")  # counted once
    (tmp_path / "sparse").touch()
    os.truncate(tmp_path / "sparse", 2**30)  # a hole takes no room
    used = diskscratch.usage(str(tmp_path))
    assert 2**20 <= used < 2**20 + 64 * 2**10


def test_remove_tree_opens_up_directories_without_permissions(tmp_path: Path) -> None:
    top = tmp_path / "scratch"
    (top / "work" / "work").mkdir(parents=True)
    (top / "work" / "work" / "f").write_text("x")
    os.symlink("/etc", top / "link")  # never followed: /etc keeps its mode
    os.chmod(top / "work" / "work", 0)  # as overlayfs leaves it
    os.chmod(top / "work", 0o100)
    mode = os.stat("/etc").st_mode
    diskscratch.remove_tree(str(top))
    assert not top.exists() and os.stat("/etc").st_mode == mode
    diskscratch.remove_tree(str(top))  # gone already: nothing to do


def test_run_directories_are_locked_while_their_process_lives_and_swept_after(tmp_path: Path) -> None:
    live = diskscratch.RunDir(str(tmp_path))
    sandbox = live.new()
    assert stat.S_IMODE(os.stat(sandbox).st_mode) == 0o700
    user_dir = Path(live.path).parent
    assert user_dir.name == f"{diskscratch.USER_DIR_PREFIX}{os.getuid()}" and stat.S_IMODE(user_dir.stat().st_mode) == 0o700
    stale = user_dir / f"{diskscratch.RUN_PREFIX}999999-dead"  # a killed process's: nobody holds its lock
    (stale / "x" / "upper").mkdir(parents=True)
    other = diskscratch.RunDir(str(tmp_path))  # its start sweeps
    assert not stale.exists() and Path(sandbox).exists()
    fd = os.open(live.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    live.close()
    other.close()
    assert list(user_dir.iterdir()) == []


def test_a_user_directory_that_is_not_private_is_refused(tmp_path: Path) -> None:
    (tmp_path / f"{diskscratch.USER_DIR_PREFIX}{os.getuid()}").mkdir(mode=0o755)
    os.chmod(tmp_path / f"{diskscratch.USER_DIR_PREFIX}{os.getuid()}", 0o755)
    with pytest.raises(diskscratch.DiskScratchError, match="not a directory of yours with mode 0700"):
        diskscratch.user_dir(str(tmp_path))


def test_a_tmpfs_is_no_disk() -> None:
    if diskscratch.filesystem_type("/dev/shm") != "tmpfs":
        pytest.skip("/dev/shm is no tmpfs here")
    with pytest.raises(diskscratch.DiskScratchError, match=r"/dev/shm is a tmpfs \(memory\), not a disk"):
        diskscratch.user_dir("/dev/shm")


def test_the_watch_finds_a_tree_over_its_bound(tmp_path: Path) -> None:
    watch = diskscratch.DiskWatch(str(tmp_path), 2**20)
    assert watch.exceeded() is None and 0 < watch.due() <= diskscratch.POLL_INTERVAL
    (tmp_path / "f").write_bytes(b"x" * 2 * 2**20)
    used = watch.exceeded()
    assert used is not None and used >= 2 * 2**20
