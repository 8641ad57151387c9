"""What this host supports (user namespaces, overlayfs in one), each with the reason and the fix.

Probes are real attempts in a forked child, cached per process. ``hint_for`` diagnoses a
failed sandbox step by reading the relevant sysctls before blaming them.
"""

from __future__ import annotations

import errno
import functools
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .box import _linux as L
from .box.child import run_in_child
from .box.steps import enter_user_namespace

CGROUP_ROOT_ENV: Final = "PYTEST_NSBOX_CGROUP_ROOT"
CGROUP_ROOT_INI: Final = "nsbox_cgroup_root"
APPARMOR_PROFILE: Final = "/etc/apparmor.d/pytest-nsbox"

SYSCTLS: Final = {
    "user.max_user_namespaces": "/proc/sys/user/max_user_namespaces",
    "kernel.unprivileged_userns_clone": "/proc/sys/kernel/unprivileged_userns_clone",
    "kernel.apparmor_restrict_unprivileged_userns": "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
}


@dataclass(frozen=True, slots=True)
class Probe:
    ok: bool
    what: str
    reason: str = ""
    fix: str = ""

    def describe(self) -> str:
        if self.ok:
            return f"{self.what}: ok"
        text = f"{self.what}: unavailable ({self.reason})"
        return f"{text}. Hint: {self.fix}" if self.fix else text


def read_sysctl(name: str) -> str | None:
    try:
        return Path(SYSCTLS[name]).read_text().strip()
    except OSError:
        return None


def cgroup_root_setting(ini_value: str, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Where sandbox cgroups go, as the plugin and ``nsbox doctor`` both decide it: the ini's
    ``nsbox_cgroup_root``, else env ``PYTEST_NSBOX_CGROUP_ROOT``, else the default ('').
    Returns (value, where it came from)."""
    if ini_value.strip():
        return ini_value.strip(), f"ini {CGROUP_ROOT_INI}"
    env = (os.environ if environ is None else environ).get(CGROUP_ROOT_ENV, "").strip()
    if env:
        return env, f"env {CGROUP_ROOT_ENV}"
    return "", "default"


def apparmor_hint() -> str:
    """The two ways out of AppArmor's restriction on unprivileged user namespaces, and what each means."""
    python = os.path.realpath(sys.executable)
    profile = (
        f"abi <abi/4.0>, include <tunables/global> profile pytest-nsbox {python} flags=(unconfined) "
        "{ userns, include if exists <local/pytest-nsbox> }"
    )
    return (
        "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns = 1, "
        "as on Ubuntu 24.04 and GitHub's runners). Either, as root, give this interpreter a profile that allows them: "
        f"write '{profile}' to {APPARMOR_PROFILE} and run 'apparmor_parser -r {APPARMOR_PROFILE}' "
        f"(only {python} and what it runs may then create user namespaces; the profile names the interpreter's "
        "real path, so a new Python needs its own); or, as root, lift the restriction for every program: "
        "'sysctl -w kernel.apparmor_restrict_unprivileged_userns=0' (until reboot; to keep it, put the line "
        "kernel.apparmor_restrict_unprivileged_userns=0 in /etc/sysctl.d/60-userns.conf; this undoes a hardening "
        "the distribution chose for the whole host)"
    )


def userns_hint() -> str:
    """Why user namespaces may be refused here, from the sysctls actually set."""
    if read_sysctl("user.max_user_namespaces") == "0":
        return "user namespaces are disabled: as root, run 'sysctl -w user.max_user_namespaces=15000'"
    if os.getuid() != 0 and read_sysctl("kernel.unprivileged_userns_clone") == "0":
        return "unprivileged user namespaces are disabled: as root, run 'sysctl -w kernel.unprivileged_userns_clone=1'"
    if os.getuid() != 0 and read_sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1":
        return apparmor_hint()
    if os.path.exists("/.dockerenv") or os.environ.get("container"):
        return "this looks like a container whose seccomp profile forbids unshare(2): run it with user namespaces allowed"
    return "check that the kernel is built with CONFIG_USER_NS and that no seccomp or LSM policy blocks unshare(2)"


def hint_for(step: str, err: int | None) -> str:
    """A fix for a failed sandbox step, diagnosed from its errno and the host's settings."""
    if step in ("unshare_namespaces", "write_id_maps") and err in (errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EUSERS):
        return userns_hint()
    if step == "mount_overlay" and err in (errno.EINVAL, errno.EPERM):
        release = platform.release()
        return (
            f"overlayfs in a user namespace needs Linux >= 5.11 (this is {release}); a lower directory with "
            "mounts below it, or on a filesystem overlayfs cannot use (overlay, fuse), is also refused"
        )
    if step == "mount_sysfs" and err == errno.EPERM:
        return "sysfs can only be mounted in a network namespace the sandbox owns; use network='none'"
    if err == errno.ENOSPC and step.startswith("mount"):
        return "mount limit reached: check /proc/sys/fs/mount-max"
    return ""


def _attempt(body: Callable[[], None]) -> tuple[bool, str]:
    """Run *body* in a forked child; (True, "") if it returned, else (False, its error)."""
    message = run_in_child(body, describe=str)
    return not message, message


@functools.cache
def linux() -> Probe:
    if sys.platform != "linux":
        return Probe(False, "Linux", f"sandboxing needs Linux namespaces; this is {sys.platform}")
    return Probe(True, "Linux")


@functools.cache
def userns() -> Probe:
    if not linux().ok:
        return linux()
    ok, message = _attempt(lambda: enter_user_namespace(L.CLONE_NEWNS))
    return Probe(ok, "user namespaces", message, "" if ok else userns_hint())


@functools.cache
def overlay_userns() -> Probe:
    if not userns().ok:
        return Probe(False, "overlayfs in a user namespace", "user namespaces are unavailable", userns().fix)
    with tempfile.TemporaryDirectory(prefix="pytest-nsbox-probe-") as tmp:
        for name in ("lower", "mnt"):
            os.mkdir(f"{tmp}/{name}")

        def body() -> None:
            enter_user_namespace(L.CLONE_NEWNS)
            L.mount(None, b"/", None, L.MS_REC | L.MS_SLAVE)
            L.mount(b"tmpfs", f"{tmp}/mnt".encode(), b"tmpfs", 0, None)
            for name in ("upper", "work", "merged"):
                os.mkdir(f"{tmp}/mnt/{name}")
            data = f"lowerdir={tmp}/lower,upperdir={tmp}/mnt/upper,workdir={tmp}/mnt/work,userxattr"
            L.mount(b"overlay", f"{tmp}/mnt/merged".encode(), b"overlay", 0, data.encode())

        ok, message = _attempt(body)
    return Probe(ok, "overlayfs in a user namespace", message, "" if ok else hint_for("mount_overlay", errno.EINVAL))


PIDFD_SETNS_KERNEL: Final = (5, 8)


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a kernel release string such as '6.1.0-13-amd64'; (0, 0) if unreadable."""
    parts = release.split(".", 2)
    try:
        return int(parts[0]), int("".join(c for c in parts[1].split("-")[0] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


@functools.cache
def prebuild_supported() -> bool:
    """Can a process join a prebuilt sandbox with setns(pidfd) (Linux 5.8)?"""
    return linux().ok and kernel_version(os.uname().release) >= PIDFD_SETNS_KERNEL


@functools.cache
def cgroup_limits(ini_root: str = "") -> Probe:
    """Can this process create sandbox cgroups with memory, pids and cpu limits, where the plugin
    puts them (*ini_root*: the ini's nsbox_cgroup_root; else the env var, see cgroup_root_setting)?
    Changes nothing (a dry-run check)."""
    from .box import cgroups

    manager = cgroups.detect(cgroup_root_setting(ini_root)[0])
    if manager is None:
        return Probe(False, "cgroup limits", NO_CGROUP_HIERARCHY)
    result = manager.check(["memory", "pids", "cpu"], dry_run=True)
    return Probe(result.ok, f"cgroup v{manager.version} limits", result.reason, result.fix)


NO_CGROUP_HIERARCHY: Final = "no cgroup hierarchy found (neither cgroup v2 at /sys/fs/cgroup nor v1 memory/pids controllers)"


@functools.cache
def subordinate_ids() -> Probe:
    """Can this process build images that need root (a debian base, run steps that change owners)?

    Root can; an ordinary user needs newuidmap/newgidmap and subordinate id ranges (see subids).
    """
    from .box import subids

    what = "image builds that need root (subordinate ids)"
    if os.geteuid() == 0:
        return Probe(True, what)
    try:
        subids.find_mapping()
    except subids.SubordinateIdError as exc:
        return Probe(False, what, "; ".join(exc.problems), exc.hint)
    return Probe(True, what)


NETWORK_KINDS: Final = {"veth": "CONFIG_VETH", "bridge": "CONFIG_BRIDGE"}


def _network_attempt(kind: str) -> Callable[[], None]:
    """In a user and network namespace of its own (as the private network's process): create a
    link of *kind* ("veth", "bridge") or a netem qdisc ("netem") with pyroute2."""

    def body() -> None:
        enter_user_namespace(L.CLONE_NEWNET)
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            if kind == "veth":
                ipr.link("add", ifname="probe0", kind="veth", peer={"ifname": "probe1"})
            elif kind == "bridge":
                ipr.link("add", ifname="probe0", kind="bridge")
            else:
                lo = ipr.link_lookup(ifname="lo")[0]
                try:
                    ipr.tc("add", "netem", index=lo, handle="1:", delay=1000)
                except Exception as exc:  # noqa: BLE001 - pyroute2 NetlinkError: ENOENT without netem
                    code = getattr(exc, "code", 0)
                    raise OSError(code, f"cannot add a netem qdisc: {os.strerror(code)}") from None

    return body


@functools.cache
def network_link(kind: str) -> Probe:
    """Can the private network's process create a *kind* link ("veth" or "bridge")?"""
    what = f"{kind} links (network='private')"
    if not userns().ok:
        return Probe(False, what, "user namespaces are unavailable", userns().fix)
    ok, message = _attempt(_network_attempt(kind))
    fix = f"a kernel with {NETWORK_KINDS[kind]} (as root: modprobe {kind})"
    return Probe(ok, what, message, "" if ok else fix)


@functools.cache
def netem() -> Probe:
    """Can the private network delay and drop packets (the netem queueing discipline)?"""
    from .box.network import NETEM_FIX

    what = "netem (sch_netem: network delay, jitter, loss)"
    if not userns().ok:
        return Probe(False, what, "user namespaces are unavailable", userns().fix)
    ok, message = _attempt(_network_attempt("netem"))
    return Probe(ok, what, message, "" if ok else NETEM_FIX)


def sandbox_id_range() -> Probe:
    """Do test sandboxes map ids 0-65536 here, or only the caller's own id (subids.sandbox_ids)?"""
    from .box import subids

    what = "ids 0-65536 in test sandboxes"
    ids = subids.sandbox_ids()
    if ids.mapping is None:
        return Probe(False, what, f"sandboxes map one id: {ids.reason}", SANDBOX_IDS_HINT)
    return Probe(True, what, ids.describe())


SANDBOX_IDS_HINT: Final = (
    "subordinate ids: newuidmap and newgidmap (package uidmap) and a range of 65536 ids in /etc/subuid and /etc/subgid "
    "(as image builds: see the line above)"
)


def all_probes() -> list[Probe]:
    return [linux(), userns(), overlay_userns(), cgroup_limits()]


def optional_probes() -> list[Probe]:
    """What some features need but a sandbox does not."""
    return [subordinate_ids(), sandbox_id_range(), network_link("veth"), network_link("bridge"), netem()]
