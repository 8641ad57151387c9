"""The mount plan as data: escaping, mount table, in-root paths, step order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_nsbox.box import mounts
from pytest_nsbox.box.steps import root_mount_source, sandbox_problems

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:5 / /dev rw,nosuid - devtmpfs udev rw
24 23 0:21 / /dev/pts rw - devpts devpts rw
25 22 0:22 / /mnt/with\\040space rw - tmpfs tmpfs rw
26 22 0:23 / /mnt/data/deep rw - tmpfs tmpfs rw
"""


def test_escape_overlay_path() -> None:
    assert mounts.escape_overlay_path("/a:b,c\\d") == "/a\\:b\\,c\\\\d"


def test_mount_table_parses_escapes_and_finds_submounts() -> None:
    table = mounts.MountTable.parse(MOUNTINFO)
    assert "/mnt/with space" in table.mount_points
    assert table.below("/mnt") == ["/mnt/data/deep", "/mnt/with space"]
    assert table.below("/dev") == ["/dev/pts"]
    assert table.below("/usr") == []


def test_make_path_in_root_never_follows_symlinks_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "usr").mkdir()
    os.symlink("/", root / "escape")  # absolute: must resolve to root, not the host's /
    os.symlink(str(outside), root / "usr" / "abs")
    os.symlink("../../..", root / "usr" / "up")
    made = mounts.make_path_in_root(str(root), "/escape/usr/abs/x/y", directory=True)
    assert made == os.fsencode(root / str(outside).lstrip("/") / "x" / "y")
    assert list(outside.iterdir()) == []
    made = mounts.make_path_in_root(str(root), "/usr/up/file", directory=False)
    assert made == os.fsencode(root / "file") and (root / "file").is_file()


def test_symlink_loop_is_an_error(tmp_path: Path) -> None:
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(OSError, match="too many symbolic links"):
        mounts.make_path_in_root(str(tmp_path), "/loop/x", directory=True)


def test_minimal_paths_keeps_stronger_access_and_depth_order() -> None:
    paths = [
        mounts.HostPath("/a/b", True),
        mounts.HostPath("/a", True),
        mounts.HostPath("/a/b/tmp", False),
        mounts.HostPath("/a/c", True),
    ]
    chosen = mounts._minimal_paths(paths)
    assert chosen == [mounts.HostPath("/a", True), mounts.HostPath("/a/b/tmp", False)]


def _plan(tmp_path: Path, image: str, network: str = "none") -> mounts.MountPlan:
    table = mounts.MountTable.parse("1 0 0:1 / / rw - ext4 /dev/vda rw\n")
    (tmp_path / "venv").mkdir(exist_ok=True)
    (tmp_path / "bt").mkdir(exist_ok=True)
    return mounts.build_plan(
        image=image,
        network=network,
        scratch=str(tmp_path / "s"),
        host_paths=[mounts.HostPath(str(tmp_path / "venv"), True), mounts.HostPath(str(tmp_path / "bt"), False)],
        mounts=table,
        host_resolv_conf="nameserver 192.0.2.53\n",
    )


def test_directory_image_plan_order(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "/images/tiny")
    names = [step.name for step in plan.steps]
    assert names[:3] == ["make_root_slave", "mount_scratch_tmpfs", "write_init_layer"]
    root_overlay = plan.steps[3]
    assert isinstance(root_overlay, mounts.MountOverlay)
    assert root_overlay.lowers == (f"{tmp_path}/s/init", "/images/tiny") and root_overlay.source == mounts.ROOT_SOURCE
    assert "userxattr" in root_overlay.options
    # binds after the fresh /tmp (a venv under /tmp must stay visible); /proc before pivot_root
    assert names.index("mount_tmp") < names.index("bind_host_path") < names.index("mount_proc") < names.index("pivot_root")
    assert names[-3:] == ["pivot_root", "set_hostname", "bring_up_loopback"]
    assert "mount_sysfs" in names


def test_network_host_binds_sys_read_only_and_keeps_the_hosts_loopback(tmp_path: Path) -> None:
    names = [step.name for step in _plan(tmp_path, "/images/tiny", network="host").steps]
    assert "mount_sysfs" not in names and "bring_up_loopback" not in names


def test_init_layer() -> None:
    files = mounts.init_layer_files("none", "nameserver 10.0.0.1\n")
    assert files["etc/hostname"] == "nsbox\n"
    assert "nameserver" not in files["etc/resolv.conf"]
    assert mounts.init_layer_files("host", "nameserver 10.0.0.1\n")["etc/resolv.conf"] == "nameserver 10.0.0.1\n"


def test_root_mount_source_takes_the_top_of_the_stack() -> None:
    text = MOUNTINFO + "40 22 0:50 / / rw - overlay nsbox-root rw,lowerdir=/x\n"
    assert root_mount_source(text) == "nsbox-root"
    assert root_mount_source(MOUNTINFO) == "/dev/vda"


def test_sandbox_problems_fail_closed() -> None:
    host = {"mnt": 1, "pid": 2, "net": 3, "user": 4, "uts": 5, "ipc": 6, "cgroup": 7}
    inside = {"mnt": 11, "pid": 12, "net": 13, "user": 14, "uts": 15, "ipc": 16, "cgroup": 17}
    assert sandbox_problems(host, inside, "none", 42, 42) == []
    assert sandbox_problems(host, {**inside, "net": 3}, "host", 42, 42) == []
    problems = sandbox_problems(host, host, "none", 2049, 42)
    assert "mnt namespace is the host's" in problems and "net namespace is the host's" in problems
    assert "the root filesystem (device 2049) is not the sandbox's (device 42)" in problems
    unknown = sandbox_problems(host, inside, "none", 42, None)
    assert unknown == ["the root filesystem (device 42) is not the sandbox's (device None)"]
