"""One object owns a sandbox's cgroup for its whole life; v1 and v2 backends differ in file names.

P has the manager create it and write the limits before the fork (``CgroupManager.create``);
each process that enters the sandbox from outside (A, or B' and then C or J) moves itself in
(``join``: writing "0" to ``tasks``/``cgroup.procs`` moves the writer), so P stays outside. P kills what is
in it on a timeout (``Cgroup.kill``), reads the counters once the test is over (``usage``), and
releases it once every process is gone (``release``). Every cgroup is named
``nsbox-<pid>-<seq>`` under a root we own; cgroups of dead pytest processes are swept at start,
and nothing else is ever written to.

The roots: a root the user configures (ini ``nsbox_cgroup_root``, env ``PYTEST_NSBOX_CGROUP_ROOT``)
must exist (an admin creates it once and hands it over); it is never created, removed or
written to, only the ``nsbox-*`` children. Only the v1 default root (``pytest-nsbox``, usable by
root) is created on demand, and removed at the end of a session when no run uses it any more.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import functools
import logging
import os
import pwd
import re
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..errors import NsboxError
from . import faults

CGROUP_MOUNT: Final = Path("/sys/fs/cgroup")
V1_CONTROLLERS: Final = ("memory", "pids", "cpu")
DEFAULT_ROOT_NAME: Final = "pytest-nsbox"
NAME_RE: Final = re.compile(r"^nsbox-(\d+)-\d+$")
CPU_PERIOD_US: Final = 100_000
MIN_CPU_QUOTA_US: Final = 1000  # the kernel refuses a smaller quota
log = logging.getLogger(__name__)

KILL_TIMEOUT: Final = 5.0  # seconds kill() waits for the cgroup to be empty


def user_name() -> str:
    """The name of the real user (for fixes to copy and paste; never a literal ``$USER``)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


class CgroupError(NsboxError):
    """A cgroup could not be created, limited or read; the message says what was attempted."""


@dataclass(frozen=True, slots=True)
class Limits:
    memory: int | None = None  # bytes
    pids: int | None = None
    cpus: float | None = None
    account_memory: bool = False  # a memory cgroup without a limit, for the peak
    # v2: an OOM kill ends every process of the sandbox (memory.oom.group); off when the test
    # expects a process it starts to be OOM-killed, and goes on (v1 always kills one process)
    oom_group: bool = True

    def controllers(self) -> list[str]:
        wanted = [("memory", self.memory is not None or self.account_memory), ("pids", self.pids is not None)]
        wanted.append(("cpu", self.cpus is not None))
        return [name for name, on in wanted if on]


@dataclass(frozen=True, slots=True)
class Usage:
    """What the kernel counted for one sandbox."""

    memory_peak: int | None = None
    oom_kills: int = 0
    pids_limit_hits: int = 0


def _write(path: Path | str, value: str) -> None:
    # os-level: P writes these for every sandbox, and pathlib's overhead was most of the cost
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise CgroupError(f"cannot write {value!r} to {path}: no such file (controller not enabled there?)") from None
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror} ({name})") from None


def _inject_fault(step: str, attempted: str) -> None:
    """The test hook (faults.py) at P's own cgroup steps, raised as the CgroupError a real failure is."""
    try:
        faults.inject("P", step)
    except OSError as exc:
        raise CgroupError(f"step {step} failed: {attempted}: {exc.strerror} (EIO)") from None


def _keyed(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def _integer(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


@functools.cache
def control_devices() -> frozenset[int]:
    """The devices of the cgroup filesystems: a descriptor on one of them is never handed to a
    sandbox (through /proc/self/fd it could reopen the file for writing, e.g. oom_control)."""
    devices: set[int] = set()
    try:
        devices.add(CGROUP_MOUNT.stat().st_dev)
        for entry in os.scandir(CGROUP_MOUNT):
            if entry.is_dir(follow_symlinks=False):
                devices.add(entry.stat(follow_symlinks=False).st_dev)
    except OSError:
        pass
    return frozenset(devices)


class Cgroup(abc.ABC):
    """One sandbox's cgroup: one directory (v2) or one per controller (v1)."""

    _counters: tuple[tuple[str, str], ...] = ()  # (controller, file) that usage() reads

    def __init__(self, name: str, dirs: dict[str, Path]) -> None:
        self.name = name
        self.dirs = dirs  # controller (or "" for v2) -> directory
        self._counter_fds: dict[str, int] = {}

    def open_counters(self) -> None:
        """Open the counter files now: P reads them right after the test, on its critical path."""
        for controller, name in self._counters:
            if controller in self.dirs and name not in self._counter_fds:
                try:
                    self._counter_fds[name] = os.open(self.dirs[controller] / name, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    pass  # read by path, or not at all, later

    def _read(self, controller: str, name: str) -> str | None:
        """A counter file's text (None if the controller is not there or it cannot be read)."""
        fd = self._counter_fds.get(name)
        try:
            if fd is not None:
                return os.pread(fd, 4096, 0).decode()
            if controller in self.dirs:
                return (self.dirs[controller] / name).read_text()
        except OSError:
            pass
        return None

    def _close_counters(self) -> None:
        for fd in self._counter_fds.values():
            os.close(fd)
        self._counter_fds.clear()

    @property
    def join_files(self) -> tuple[bytes, ...]:
        """Files the sandbox's first process writes "0" to, to move itself in (see join)."""
        return tuple(os.fsencode(d / self._procs_file) for d in self.dirs.values())

    _procs_file = "cgroup.procs"

    @abc.abstractmethod
    def apply(self, limits: Limits) -> None: ...

    @abc.abstractmethod
    def usage(self) -> Usage: ...

    def pids(self) -> list[int]:
        found: set[int] = set()
        for d in self.dirs.values():
            try:
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except OSError:
                pass
        return sorted(found)

    def kill(self, timeout: float = KILL_TIMEOUT) -> None:
        """SIGKILL every process in the cgroup; return once none is left (or after *timeout* s)."""
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)  # a killed process stays listed until its exit is complete

    def release(self) -> None:
        """The sandbox is gone: remove the cgroup (a failure is logged as a warning: the test's
        outcome is decided already, and a leftover is swept by a later run)."""
        try:
            self.remove()
        except CgroupError as exc:
            log.warning("%s", exc)

    def discard(self) -> None:
        """The sandbox will not run, or ended abnormally: kill what is in the cgroup, release it."""
        self.kill()
        self.release()

    def remove(self) -> None:
        self._close_counters()
        for d in self.dirs.values():
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise CgroupError(f"cannot remove {d}: {exc.strerror}") from None


def join(files: Iterable[bytes]) -> None:
    """In the sandbox's first process: move the caller into its cgroup (one write per hierarchy).

    The paths are computed in P (``Cgroup.join_files``): the child only writes."""
    for path in files:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


class CgroupV1(Cgroup):
    _procs_file = "tasks"  # writing "0" here moves the writer (the joining process is single-threaded)
    _counters = (("memory", "memory.max_usage_in_bytes"), ("memory", "memory.oom_control"), ("pids", "pids.events"))

    def apply(self, limits: Limits) -> None:
        if limits.memory is not None:
            memory = str(self.dirs["memory"])
            _write(f"{memory}/memory.limit_in_bytes", str(limits.memory))
            if os.path.exists(f"{memory}/memory.memsw.limit_in_bytes"):  # swap is no way around the limit
                _write(f"{memory}/memory.memsw.limit_in_bytes", str(limits.memory))
            else:
                _write(f"{memory}/memory.swappiness", "0")
        if limits.pids is not None:
            _write(f"{self.dirs['pids']}/pids.max", str(limits.pids))
        if limits.cpus is not None:
            cpu = str(self.dirs["cpu"])
            _write(f"{cpu}/cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(f"{cpu}/cpu.cfs_quota_us", str(max(MIN_CPU_QUOTA_US, round(limits.cpus * CPU_PERIOD_US))))

    def usage(self) -> Usage:
        return Usage(
            memory_peak=_integer(self._read("memory", "memory.max_usage_in_bytes")),
            oom_kills=_keyed(self._read("memory", "memory.oom_control")).get("oom_kill", 0),
            pids_limit_hits=_keyed(self._read("pids", "pids.events")).get("max", 0),
        )


class CgroupV2(Cgroup):
    _counters = (("", "memory.peak"), ("", "memory.events"), ("", "pids.events"))

    def apply(self, limits: Limits) -> None:
        path = self.dirs[""]
        if limits.memory is not None:
            _write(path / "memory.max", str(limits.memory))
            if (path / "memory.swap.max").exists():  # no swap accounting: nothing to cap
                _write(path / "memory.swap.max", "0")
            if limits.oom_group:
                _write(path / "memory.oom.group", "1")  # an OOM ends the whole sandbox
        if limits.pids is not None:
            _write(path / "pids.max", str(limits.pids))
        if limits.cpus is not None:
            _write(path / "cpu.max", f"{max(MIN_CPU_QUOTA_US, round(limits.cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}")

    def usage(self) -> Usage:
        return Usage(
            memory_peak=_integer(self._read("", "memory.peak")),
            oom_kills=_keyed(self._read("", "memory.events")).get("oom_kill", 0),
            pids_limit_hits=_keyed(self._read("", "pids.events")).get("max", 0),
        )

    def kill(self, timeout: float = KILL_TIMEOUT) -> None:
        kill_file = self.dirs[""] / "cgroup.kill"
        if kill_file.exists():
            _write(kill_file, "1")
        super().kill(timeout)


@dataclass(frozen=True, slots=True)
class Availability:
    ok: bool
    reason: str = ""
    fix: str = ""
    note: str = ""  # what a run would change to make it work (a dry-run check)


class CgroupManager(abc.ABC):
    """Creates sandbox cgroups under a root this process may write to."""

    version: int

    def __init__(self) -> None:
        self._seq = 0

    def _next_name(self) -> str:
        self._seq += 1
        return f"nsbox-{os.getpid()}-{self._seq}"

    @abc.abstractmethod
    def check(self, controllers: list[str], *, dry_run: bool = False) -> Availability:
        """Can sandbox cgroups with *controllers* be created? *dry_run*: change nothing on the
        way (``nsbox doctor``; a run may enable controllers in a v2 root's subtree_control)."""

    @abc.abstractmethod
    def create(self, limits: Limits) -> Cgroup: ...

    @abc.abstractmethod
    def roots(self) -> list[Path]: ...

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op unless the manager owns its root
        """End of session: remove what only this manager created (nothing by default)."""

    def sweep(self) -> list[str]:
        """Remove our cgroups left by pytest processes that no longer exist; return their names."""
        removed = []
        for root in self.roots():
            try:
                entries = list(os.scandir(root))
            except OSError:
                continue
            for entry in entries:
                match = NAME_RE.match(entry.name)
                if not match or not entry.is_dir(follow_symlinks=False) or os.path.exists(f"/proc/{match.group(1)}"):
                    continue
                try:
                    os.rmdir(entry.path)
                    removed.append(entry.path)
                except OSError:
                    pass  # still has processes (or not ours to remove): leave it
        return removed


class ManagerV1(CgroupManager):
    version = 1

    def __init__(self, root_name: str, *, configured: bool | None = None) -> None:
        super().__init__()
        self.root_name = root_name
        # a configured root is the admin's: it must exist, and is never created or removed
        self.configured = root_name != DEFAULT_ROOT_NAME if configured is None else configured

    @property
    def owns_root(self) -> bool:
        return not self.configured

    def close(self) -> None:
        """Remove our default roots if no run uses them any more (rmdir fails otherwise)."""
        if self.owns_root:
            for root in self.roots():
                try:
                    root.rmdir()
                except OSError:
                    pass

    def roots(self) -> list[Path]:
        return [CGROUP_MOUNT / ctrl / self.root_name for ctrl in V1_CONTROLLERS]

    def check(self, controllers: list[str], *, dry_run: bool = False) -> Availability:
        for ctrl in controllers:
            hierarchy = CGROUP_MOUNT / ctrl
            if not (hierarchy / "cgroup.procs").exists():
                return Availability(False, f"the cgroup v1 {ctrl} controller is not mounted at {hierarchy}")
            root = hierarchy / self.root_name
            if root.is_dir():
                if not os.access(root, os.W_OK) or not os.access(root / "tasks", os.W_OK):
                    owner = _owner(root)
                    return Availability(
                        False,
                        f"{root} (owned by {owner}) is not writable by {user_name()} (uid {os.getuid()})",
                        self.fix(controllers),
                    )
            elif self.configured:
                return Availability(
                    False,
                    f"the configured cgroup root {root} does not exist, and pytest-nsbox does not create it",
                    self.fix(controllers),
                )
            elif not os.access(hierarchy, os.W_OK):
                return Availability(False, f"cannot create {root} as {user_name()} (uid {os.getuid()})", self.fix(controllers))
        return Availability(True)

    def fix(self, controllers: list[str]) -> str:
        """What root runs once to hand this root over to the real user (in every hierarchy
        mounted: the limits a test may ask for need all three)."""
        mounted = [c for c in V1_CONTROLLERS if (CGROUP_MOUNT / c / "cgroup.procs").exists()]
        # the default root is root's (created and removed by its runs): a user gets one of their own
        name = self.root_name if self.configured or os.getuid() == 0 else f"{DEFAULT_ROOT_NAME}-{user_name()}"
        return v1_fix(name, mounted or [c for c in V1_CONTROLLERS if c in controllers])

    def create(self, limits: Limits) -> Cgroup:
        name = self._next_name()
        dirs: dict[str, Path] = {}
        try:
            _inject_fault("create_cgroup", f"mkdir {self.root_name}/{name}")
            for ctrl in limits.controllers():
                path = f"{CGROUP_MOUNT}/{ctrl}/{self.root_name}/{name}"
                for attempt in range(3):  # another run may remove an empty default root between the two mkdirs
                    try:
                        os.mkdir(path)
                        break
                    except FileNotFoundError:
                        if attempt == 2 or not self.owns_root:
                            raise
                        with contextlib.suppress(FileExistsError):
                            os.mkdir(os.path.dirname(path))  # the default root only: never its parents
                dirs[ctrl] = Path(path)
            cgroup = CgroupV1(name, dirs)
            _inject_fault("write_cgroup_limits", f"write the limits of {name}")
            cgroup.apply(limits)
            cgroup.open_counters()
        except OSError as exc:
            CgroupV1(name, dirs).remove()
            raise CgroupError(f"cannot create cgroup {name}: {exc}") from None
        except CgroupError:
            CgroupV1(name, dirs).remove()
            raise
        return cgroup


def _owner(path: Path) -> str:
    try:
        uid = path.stat().st_uid
    except OSError:
        return "?"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def v1_fix(root_name: str, controllers: list[str]) -> str:
    """The commands root runs once so that the real user can use *root_name* on cgroup v1."""
    dirs = " ".join(f"{CGROUP_MOUNT}/{c}/{root_name}" for c in controllers)
    user = user_name()
    handover = f"mkdir -p {dirs}" + (f" && chown -R {user}: {dirs}" if os.getuid() != 0 else "")
    then = f"then set ini nsbox_cgroup_root = {root_name} (or env PYTEST_NSBOX_CGROUP_ROOT={root_name})"
    return f"as root, once: {handover}; {then}"


class ManagerV2(CgroupManager):
    version = 2

    def __init__(self, root: Path, *, configured: bool = False, own: str | None = None) -> None:
        super().__init__()
        self.root = root
        self.configured = configured  # named by the user: never created
        self.own = own  # pytest's cgroup (relative to the cgroup2 mount); None: read when needed

    def roots(self) -> list[Path]:
        return [self.root]

    def fix(self) -> str:
        return v2_fix(configured=self.configured)

    def check(self, controllers: list[str], *, dry_run: bool = False) -> Availability:
        user = f"{user_name()} (uid {os.getuid()})"
        if not self.root.is_dir():
            what = "the configured cgroup root" if self.configured else "the cgroup"
            return Availability(False, f"{what} {self.root} does not exist, and pytest-nsbox does not create it", self.fix())
        try:
            enabled = (self.root / "cgroup.subtree_control").read_text().split()
            available = (self.root / "cgroup.controllers").read_text().split()
        except OSError as exc:
            return Availability(False, f"cannot read {self.root}/cgroup.subtree_control: {exc.strerror}", self.fix())
        missing = [c for c in controllers if c not in enabled]
        unavailable = [c for c in missing if c not in available]
        if unavailable:
            reason = (
                f"controllers {', '.join(unavailable)} are not delegated to {self.root} "
                f"(its cgroup.controllers: {' '.join(available) or 'none'})"
            )
            return Availability(False, reason, self.fix())
        if not os.access(self.root, os.W_OK):
            reason = f"{self.root} (owned by {_owner(self.root)}) is not writable by {user}: it is not delegated to you"
            return Availability(False, reason, self.fix())
        ancestor = self._common_ancestor()
        if ancestor is not None and not os.access(ancestor / "cgroup.procs", os.W_OK):
            reason = (
                f"pytest's cgroup {CGROUP_MOUNT}{self._own()} is outside {self.root}: moving a sandbox there needs "
                f"write access to {ancestor}/cgroup.procs, which {user} lacks"
            )
            return Availability(False, reason, self.fix())
        if not missing:
            return Availability(True)
        plus = " ".join(f"+{c}" for c in missing)
        if dry_run:
            control = self.root / "cgroup.subtree_control"
            if not os.access(control, os.W_OK):
                reason = f"controllers {', '.join(missing)} are not enabled in {control}, which {user} cannot write"
                return Availability(False, reason, self.fix())
            if self.root != CGROUP_MOUNT and _has_processes(self.root):
                reason = f"{self.root} has processes of its own: cgroup v2 cannot enable {plus} in its subtree_control (EBUSY)"
                return Availability(False, reason, self.fix())
            return Availability(True, note=f"a run enables {plus} in {control}")
        try:
            _write(self.root / "cgroup.subtree_control", plus)
        except CgroupError as exc:
            return Availability(False, str(exc), self.fix())
        return Availability(True)

    def _own(self) -> str:
        if self.own is None:
            self.own = own_cgroup_v2()
        return self.own

    def _common_ancestor(self) -> Path | None:
        """The lowest cgroup that holds both pytest and the root (None: the root holds pytest)."""
        try:
            below = self.root.relative_to(CGROUP_MOUNT).as_posix()
        except ValueError:
            return None
        relative = "/" if below == "." else f"/{below}"
        own = self._own()
        common = os.path.commonpath([own, relative]) if own.startswith("/") else "/"
        return None if common == relative else CGROUP_MOUNT / common.strip("/")

    def create(self, limits: Limits) -> Cgroup:
        name = self._next_name()
        path = self.root / name
        _inject_fault("create_cgroup", f"mkdir {path}")
        try:
            path.mkdir()
        except OSError as exc:
            raise CgroupError(f"cannot create cgroup {path}: {exc.strerror}") from None
        cgroup = CgroupV2(name, {"": path})
        try:
            _inject_fault("write_cgroup_limits", f"write the limits of {path}")
            cgroup.apply(limits)
            cgroup.open_counters()
        except CgroupError:
            cgroup.remove()
            raise
        return cgroup


def _has_processes(path: Path) -> bool:
    try:
        return bool((path / "cgroup.procs").read_text().split())
    except OSError:
        return False


V2_SUBTREE_NAME: Final = "nsbox-{user}"


def v2_fix(*, configured: bool = False) -> str:
    """How the real user gets a delegated cgroup v2 subtree: from systemd, or from root once."""
    user = user_name()
    python = os.path.realpath(sys.executable)
    tree = f"{CGROUP_MOUNT}/{V2_SUBTREE_NAME.format(user=user)}"
    name = V2_SUBTREE_NAME.format(user=user)
    command = f"systemd-run --user --scope -p Delegate=yes {python} -m pytest ..."
    systemd = f"run pytest in a scope systemd delegates to you: '{command}'"
    admin = (
        f"as root, once: mkdir -p {tree}/runner && echo '+memory +pids +cpu' > {tree}/cgroup.subtree_control && "
        f"chown {user}: {tree} {tree}/cgroup.procs {tree}/cgroup.subtree_control {tree}/cgroup.threads && "
        f"chown -R {user}: {tree}/runner; start the shell that runs pytest inside it "
        f"(as root: echo SHELL_PID > {tree}/runner/cgroup.procs) and set ini nsbox_cgroup_root = {name}"
    )
    if configured:
        return f"{admin}; or drop nsbox_cgroup_root and {systemd}"
    return f"{systemd}; or {admin}"


def own_cgroup_v2() -> str:
    """This process's cgroup v2 path (relative to the cgroup2 mount), from /proc/self/cgroup."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


def own_memory_headroom() -> int | None:
    """How much more memory this process's cgroup (and its ancestors) may use: the smallest
    ``limit - usage`` on the way up (v2 memory.max/memory.current, v1 memory.limit_in_bytes/
    memory.usage_in_bytes); None when no limit applies or it cannot be read."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    if (CGROUP_MOUNT / "cgroup.controllers").exists():
        path, limit_file, usage_file = own_cgroup_v2(), "memory.max", "memory.current"
        base = CGROUP_MOUNT
    else:
        path = next((line.split(":", 2)[2] for line in lines if "memory" in line.split(":")[1].split(",")), "")
        limit_file, usage_file, base = "memory.limit_in_bytes", "memory.usage_in_bytes", CGROUP_MOUNT / "memory"
    if not path:
        return None
    headroom: int | None = None
    current = base / path.strip("/")
    while True:
        try:
            limit_text = (current / limit_file).read_text().strip()
            usage = int((current / usage_file).read_text())
            if limit_text != "max" and int(limit_text) < 2**62:
                room = max(int(limit_text) - usage, 0)
                headroom = room if headroom is None else min(headroom, room)
        except (OSError, ValueError):
            pass
        if current == base or base not in current.parents:
            return headroom
        current = current.parent


def detect(root_setting: str = "") -> CgroupManager | None:
    """The manager for this host: v2 when /sys/fs/cgroup is a cgroup2 mount, v1 when the
    v1 controllers are mounted, else None. *root_setting* (ini nsbox_cgroup_root, else env
    PYTEST_NSBOX_CGROUP_ROOT) overrides where sandbox cgroups go; such a root must exist."""
    if not CGROUP_MOUNT.is_dir():
        return None
    if (CGROUP_MOUNT / "cgroup.controllers").exists():
        own = own_cgroup_v2()
        if root_setting.strip("/"):
            return ManagerV2(CGROUP_MOUNT / root_setting.strip("/"), configured=True, own=own)
        here = CGROUP_MOUNT / own.strip("/")
        # In the root cgroup, processes and child cgroups may coexist; elsewhere the
        # no-internal-processes rule puts sandboxes beside P, under its (delegated) parent.
        return ManagerV2(here if own == "/" else here.parent, own=own)
    if (CGROUP_MOUNT / "memory" / "cgroup.procs").exists() or (CGROUP_MOUNT / "pids" / "cgroup.procs").exists():
        return ManagerV1(root_setting.strip("/") or DEFAULT_ROOT_NAME, configured=bool(root_setting.strip("/")))
    return None
