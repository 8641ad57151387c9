"""The mount plan as data: escaping, mount table, in-root paths, step order."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from pathlib import Path

import pytest

from pytest_nsbox.box import mounts
from pytest_nsbox.box.steps import root_mount_source, sandbox_problems

DOCUMENTATION_V6 = ipaddress.ip_network("2001:db8::/32")  # RFC 3849
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
        mounts.HostPath("/a/b", mounts.READ_ONLY),
        mounts.HostPath("/a", mounts.READ_ONLY),
        mounts.HostPath("/a/b/tmp", mounts.SHARED),
        mounts.HostPath("/a/c", mounts.READ_ONLY),
    ]
    chosen = mounts._minimal_paths(paths)
    assert chosen == [mounts.HostPath("/a", mounts.READ_ONLY), mounts.HostPath("/a/b/tmp", mounts.SHARED)]


def _plan(tmp_path: Path, image: str, network: str = "none", address_families: tuple[int, ...] = ()) -> mounts.MountPlan:
    table = mounts.MountTable.parse("1 0 0:1 / / rw - ext4 /dev/vda rw\n")
    (tmp_path / "venv").mkdir(exist_ok=True)
    (tmp_path / "bt").mkdir(exist_ok=True)
    return mounts.build_plan(
        image=image,
        network=network,
        scratch=str(tmp_path / "s"),
        host_paths=[
            mounts.HostPath(str(tmp_path / "venv"), mounts.READ_ONLY),
            mounts.HostPath(str(tmp_path / "bt"), mounts.SHARED),
        ],
        mounts=table,
        host_resolv_conf="nameserver 192.0.2.53\n",
        address_families=address_families,
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
    assert names[-3:] == ["pivot_root", "set_hostname", "bring_up_loopback"]  # no address family to add
    assert "mount_sysfs" in names


def test_network_host_binds_sys_read_only_and_keeps_the_hosts_loopback(tmp_path: Path) -> None:
    names = [step.name for step in _plan(tmp_path, "/images/tiny", network="host").steps]
    assert "mount_sysfs" not in names and "bring_up_loopback" not in names
    assert "add_loopback_addresses" not in names


def test_network_none_adds_an_address_of_each_family_the_host_has(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "/images/tiny", address_families=(socket.AF_INET, socket.AF_INET6))
    assert [step.name for step in plan.steps][-2:] == ["bring_up_loopback", "add_loopback_addresses"]
    step = plan.steps[-1]
    assert isinstance(step, mounts.AddLoopbackAddresses) and step.families == (socket.AF_INET, socket.AF_INET6)
    for family in step.families:
        address = mounts.LOOPBACK_EXTRA_ADDRESSES[family][0]
        assert address not in ("127.0.0.1", "::1")  # glibc's AI_ADDRCONFIG ignores exactly these
        assert ipaddress.ip_address(address).is_loopback or ipaddress.ip_address(address) in DOCUMENTATION_V6


def test_hosts_file_is_the_images_own_plus_the_hostname() -> None:
    host = "127.0.0.1 localhost\n127.0.0.1 vm # the VM\n"
    assert mounts.hosts_file(host) == host + "127.0.1.1\tnsbox\n"
    assert mounts.hosts_file("127.0.0.1 localhost") == "127.0.0.1 localhost\n127.0.1.1\tnsbox\n"
    named = "127.0.0.1 localhost nsbox\n"
    assert mounts.hosts_file(named) == named
    assert mounts.hosts_file("# nsbox\n").endswith("127.0.1.1\tnsbox\n")  # a comment names nothing
    generated = mounts.hosts_file(None)
    assert "127.0.0.1\tlocalhost" in generated and "nsbox" in generated


def test_read_image_file_sees_what_the_overlay_shows(tmp_path: Path) -> None:
    top, middle, bottom = (tmp_path / name for name in ("top", "middle", "bottom"))
    for layer in (top, middle, bottom):
        (layer / "etc").mkdir(parents=True)
    (bottom / "etc" / "hosts").write_text("bottom\n")
    assert mounts.read_image_file((str(top), str(middle), str(bottom)), "etc/hosts") == "bottom\n"
    (middle / "etc" / "hosts").write_text("middle\n")
    assert mounts.read_image_file((str(top), str(middle), str(bottom)), "etc/hosts") == "middle\n"
    assert mounts.read_image_file(str(bottom), "etc/hosts") == "bottom\n"
    assert mounts.read_image_file(str(top), "etc/hosts") is None


@pytest.mark.needs_root
def test_read_image_file_stops_at_whiteouts_and_opaque_directories(tmp_path: Path) -> None:
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    (top / "etc").mkdir(parents=True)
    (bottom / "etc").mkdir(parents=True)
    (bottom / "etc" / "hosts").write_text("bottom\n")
    layers = (str(top), str(bottom))
    os.mknod(top / "etc" / "hosts", 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # deleted in the top layer
    assert mounts.read_image_file(layers, "etc/hosts") is None
    os.unlink(top / "etc" / "hosts")
    os.setxattr(top / "etc", "trusted.overlay.opaque", b"y")  # top's /etc replaces bottom's
    assert mounts.read_image_file(layers, "etc/hosts") is None


def test_read_image_file_resolves_symlinks_inside_the_image(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "static").mkdir()
    (tmp_path / "etc" / "static" / "hosts").write_text("image\n")
    (tmp_path / "etc" / "hosts").symlink_to("/etc/static/hosts")  # absolute: the image's, not the host's
    assert mounts.read_image_file(str(tmp_path), "etc/hosts") == "image\n"
    (tmp_path / "etc" / "resolv.conf").symlink_to("/etc/nowhere")
    assert mounts.read_image_file(str(tmp_path), "etc/resolv.conf") is None
    (tmp_path / "etc" / "loop").symlink_to("loop")
    assert mounts.read_image_file(str(tmp_path), "etc/loop") is None


def test_read_image_file_host_is_the_hosts_root() -> None:
    assert mounts.read_image_file("host", "etc/hosts") == Path("/etc/hosts").read_text()


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


def test_sandbox_paths_the_rootdir_and_cwd_are_throwaway_basetemp_shared() -> None:
    paths = mounts.sandbox_paths(interpreter=["/venv"], rootdir="/tmp/proj", cwd="/tmp/elsewhere", basetemp="/tmp/bt")
    assert paths == [
        mounts.HostPath("/venv", mounts.READ_ONLY),
        mounts.HostPath("/tmp/proj", mounts.THROWAWAY),
        mounts.HostPath("/tmp/elsewhere", mounts.THROWAWAY),
        mounts.HostPath("/tmp/bt", mounts.SHARED),
    ]


@pytest.mark.parametrize("cwd", ["/", "/tmp", "/var/tmp/", "/run", "/dev/shm", "/proc/1", "/sys/kernel"])
def test_sandbox_paths_never_take_root_or_a_fresh_directory_from_the_host(cwd: str) -> None:
    paths = mounts.sandbox_paths(interpreter=[], rootdir="/home/u/proj", cwd=cwd, basetemp=None)
    assert paths == [mounts.HostPath("/home/u/proj", mounts.THROWAWAY)]


def test_minimal_paths_a_throwaway_overlay_covers_read_only_paths_below_it_not_shared_ones() -> None:
    chosen = mounts._minimal_paths(
        [
            mounts.HostPath("/tmp/proj/.venv/lib", mounts.READ_ONLY),
            mounts.HostPath("/tmp/proj", mounts.READ_ONLY),  # sys.path holds the rootdir
            mounts.HostPath("/tmp/proj", mounts.THROWAWAY),
            mounts.HostPath("/tmp/proj/bt", mounts.SHARED),
        ]
    )
    assert chosen == [mounts.HostPath("/tmp/proj", mounts.THROWAWAY), mounts.HostPath("/tmp/proj/bt", mounts.SHARED)]


def test_host_paths_are_mounted_after_the_fresh_directories_shallow_first(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / "bt").mkdir(parents=True)
    plan = mounts.build_plan(
        image="/images/tiny",
        network="none",
        scratch=str(tmp_path / "s"),
        host_paths=mounts.sandbox_paths(interpreter=[], rootdir=str(project), cwd=str(project), basetemp=str(project / "bt")),
        mounts=mounts.MountTable.parse("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
        host_resolv_conf="",
        address_families=(),
    )
    names = [step.name for step in plan.steps]
    overlay = next(s for s in plan.steps if isinstance(s, mounts.MountOverlay) and s.lowers == (str(project),))
    assert overlay.root == plan.root and overlay.target == str(project)  # resolved inside the new root
    assert names.index("mount_tmp") < names.index("mount_var_tmp") < plan.steps.index(overlay)
    assert plan.steps.index(overlay) < names.index("bind_host_path") < names.index("pivot_root")


def test_a_throwaway_path_with_mounts_below_is_rebuilt_one_level_down(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / "data").mkdir(parents=True)
    (project / "src").mkdir()
    (project / "setup.py").write_text("")
    os.symlink("src", project / "link")
    table = mounts.MountTable.parse(f"1 0 0:1 / / rw - ext4 /dev/vda rw\n2 1 0:2 / {project}/data rw - tmpfs t rw\n")
    plan = mounts.build_plan(
        image="/images/tiny",
        network="none",
        scratch=str(tmp_path / "s"),
        host_paths=[mounts.HostPath(str(project), mounts.THROWAWAY)],
        mounts=table,
        host_resolv_conf="",
        address_families=(),
    )
    overlays = {s.target for s in plan.steps if isinstance(s, mounts.MountOverlay) and s.root is not None}
    assert overlays == {f"{project}/data", f"{project}/src"}
    assert any(isinstance(s, mounts.BindScratchDir) and s.target == str(project) for s in plan.steps)
    links = [s for s in plan.steps if isinstance(s, mounts.MakeLinks)]
    assert links and links[0].symlinks == ((f"{project}/link", "src"),)


@pytest.mark.parametrize("image", ["host", "/images/tiny"])
def test_every_writable_place_is_on_the_one_bounded_scratch(tmp_path: Path, image: str) -> None:
    plan = mounts.build_plan(
        image=image,
        network="none",
        scratch=str(tmp_path / "s"),
        host_paths=[],
        mounts=mounts.MountTable.parse("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
        host_resolv_conf="",
        address_families=(),
        disk=64 * 2**20,
    )
    tmpfs = [s for s in plan.steps if isinstance(s, mounts.MountFs) and s.fstype == "tmpfs"]
    scratch = (str(tmp_path / "s"), f"mode=0755,size={64 * 2**20}", mounts.ROOT_SOURCE)
    assert [(s.target, s.data, s.source) for s in tmpfs] == [scratch]
    fresh = {s.target.rpartition("/root")[2] or s.target: s for s in plan.steps if isinstance(s, mounts.BindScratchDir)}
    for place in ["/tmp", "/var/tmp", "/run", "/dev", "/dev/shm"]:
        assert place in fresh and fresh[place].source.startswith(f"{tmp_path / 's'}/"), place
    assert oct(fresh["/tmp"].mode) == oct(0o1777) and oct(fresh["/dev/shm"].mode) == oct(0o1777)
    uppers = [s.upper for s in plan.steps if isinstance(s, mounts.MountOverlay)]
    assert uppers and all(u.startswith(f"{tmp_path / 's'}/") for u in uppers)


@pytest.mark.parametrize("network", ["none", "host"])
def test_kernel_interfaces_are_masked_or_read_only_before_pivot_root(tmp_path: Path, network: str) -> None:
    plan = _plan(tmp_path, "/images/tiny", network=network)
    names = [step.name for step in plan.steps]
    root = f"{tmp_path}/s/root"
    masks = {s.target[len(root) :]: s.name for s in plan.steps if isinstance(s, mounts.MaskPath)}
    expected = {*mounts.MASKED_PROC_PATHS, *mounts.MASKED_SYS_PATHS} | ({"/sys/fs/cgroup"} if network == "host" else set())
    assert set(masks) == expected
    assert masks["/proc/kcore"] == "mask_proc_kcore" and masks["/sys/firmware"] == "mask_sys_firmware"
    readonly = {s.target[len(root) :]: s for s in plan.steps if isinstance(s, mounts.RemountReadonly)}
    assert set(readonly) == {"/proc/sys", *mounts.READONLY_PROC_PATHS}
    assert readonly["/proc/sysrq-trigger"].name == "readonly_proc_sysrq_trigger" and readonly["/proc/sysrq-trigger"].missing_ok
    # on /proc and /sys once they are mounted, before the old root (and its /dev/null) goes
    sys_step = "mount_sysfs" if network == "none" else "bind_host_path"
    last_sys = max(i for i, name in enumerate(names) if name == sys_step)
    assert names.index("mount_proc") < names.index("make_mask_sources") < names.index("mask_proc_kcore")
    assert last_sys < names.index("mask_sys_firmware") < names.index("pivot_root")


def test_a_mask_hides_a_file_or_a_directory_and_skips_a_missing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What MaskPath binds where, recorded from its mount calls (the real mounts: tests/integration/test_credentials.py)."""
    sources = tmp_path / "masked"
    (sources / mounts.MASK_DIR).mkdir(parents=True)
    (sources / mounts.MASK_FILE).write_text("")
    (tmp_path / "keys").write_text("secret")
    (tmp_path / "acpi").mkdir()
    calls: list[tuple[bytes | None, bytes, int]] = []
    record = lambda source, target, fstype, flags=0, data=None: calls.append((source, target, flags))  # noqa: E731
    monkeypatch.setattr(mounts.L, "mount", record)
    for name in ("keys", "acpi", "missing"):
        mounts.MaskPath(f"mask_{name}", str(tmp_path / name), str(sources)).run()
    assert [(c[0], c[1]) for c in calls[::2]] == [
        (os.fsencode(sources / mounts.MASK_FILE), os.fsencode(tmp_path / "keys")),
        (os.fsencode(sources / mounts.MASK_DIR), os.fsencode(tmp_path / "acpi")),
    ]
    assert all(c[2] & mounts.L.MS_RDONLY and c[2] & mounts.L.MS_REMOUNT for c in calls[1::2])


def test_a_disk_scratch_is_a_directory_bound_per_sandbox(tmp_path: Path) -> None:
    """scratch="disk": no tmpfs; each sandbox's own directory fills the shared plan's step."""
    table = mounts.MountTable.parse("1 0 0:1 / / rw - ext4 /dev/vda rw\n")
    plan = mounts.build_plan(
        image="host", network="none", scratch=str(tmp_path / "s"), host_paths=[], mounts=table, disk=2**20, on_disk=True
    )
    assert plan.on_disk
    names = [step.name for step in plan.steps]
    assert "mount_scratch_tmpfs" not in names and names[1] == "mount_scratch_dir"
    scratch_step = plan.steps[1]
    assert isinstance(scratch_step, mounts.BindDiskScratch) and scratch_step.source is None
    with pytest.raises(OSError, match="no directory on disk was made for this sandbox"):
        scratch_step.run()
    filled = mounts.with_scratch_source(plan.steps, "/var/tmp/x/1")
    assert filled[1] == mounts.BindDiskScratch(str(tmp_path / "s"), "/var/tmp/x/1")
    assert filled[2:] == plan.steps[2:]
    # image "host": "/" is an overlay named like every sandbox root (require_sandbox checks the name)
    root = next(step for step in plan.steps if step.name == "mount_root_dir")
    assert isinstance(root, mounts.MountOverlay) and root.source == mounts.ROOT_SOURCE
    assert root.upper.startswith(str(tmp_path / "s") + "/")
    assert not any(isinstance(step, mounts.MountFs) and step.fstype == "tmpfs" for step in plan.steps)
