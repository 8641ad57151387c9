"""A destructive test, contained.

The sandboxed tests below delete a directory and overwrite files in /etc. Inside an nsbox
sandbox "/" is a throwaway overlay of the host's root filesystem: a change lands in a per-test
layer in memory that is discarded when the test ends (the exception: pytest's basetemp, where
tmp_path lives, is shared with the host). The last test runs on the host and checks that
nothing happened there.

Safety rules every destructive test in this demo follows:
  * call pytest_nsbox.require_sandbox() first: it raises RuntimeError unless the test really runs
    inside a sandbox, so the test can never do damage if the plugin is off (-p no:nsbox);
  * delete only the canary that conftest.py planted for it, never real data.

Tests in one file run in order, top to bottom; run this demo without -n (xdist).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

import pytest_nsbox


def fstype_of(path: str | os.PathLike[str]) -> str:
    """The filesystem type of the mount that holds *path*, from /proc/self/mountinfo."""
    target = os.path.realpath(path)
    best, best_type = "", ""
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            before, _, after = line.partition(" - ")
            mount_point = before.split()[4].encode().decode("unicode_escape")  # undo \040-style escapes
            if (target + "/").startswith(mount_point.rstrip("/") + "/") and len(mount_point) >= len(best):
                best, best_type = mount_point, after.split()[0]
    return best_type


@pytest.mark.nsbox  # defaults: image="host" (overlay of this machine's "/"), network="none"
def test_destroy_the_canary_inside_the_sandbox(canary) -> None:
    pytest_nsbox.require_sandbox()  # first line of every destructive test
    assert canary.intact()  # the host's files are visible inside...
    assert fstype_of(canary.path.parent) == "overlay"  # ...through a throwaway overlay

    shutil.rmtree(canary.path)  # rm -rf the canary
    canary.etc_dir.mkdir()  # write where only root may write on the host
    (canary.etc_dir / "pwned").write_text("a test wrote this\n")
    Path("/etc/hostname").write_text("overwritten-by-a-test\n")

    # Inside the sandbox the damage is real:
    assert not canary.path.exists()
    assert (canary.etc_dir / "pwned").read_text() == "a test wrote this\n"
    assert Path("/etc/hostname").read_text() == "overwritten-by-a-test\n"
    assert socket.gethostname() == "nsbox"  # the sandbox's own UTS namespace


@pytest_nsbox.nsbox  # the decorator form of the same marker
def test_the_next_sandbox_starts_fresh(canary) -> None:
    """Each sandboxed test gets its own new layer: the previous test's changes are gone."""
    pytest_nsbox.require_sandbox()
    assert canary.intact()
    assert not canary.etc_dir.exists()
    assert Path("/etc/hostname").read_text() == "nsbox\n"


def test_the_host_is_untouched(canary) -> None:
    """Not marked: runs on the host, after the sandboxed tests above."""
    with pytest.raises(RuntimeError, match="not inside an nsbox sandbox"):
        pytest_nsbox.require_sandbox()  # this is why destructive tests call it first
    assert canary.intact(), f"the canary {canary.path} was damaged on the host"
    assert not canary.etc_dir.exists()
    if canary.host_hostname:
        assert Path("/etc/hostname").read_text() == canary.host_hostname
