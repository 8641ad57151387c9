"""The sandbox's filesystem: a mount plan built in P (pure data), executed step by step by PID 1.

The plan is computed once per (image, network, cwd) per session; the sandbox's PID 1 (B, or B'
in the prebuilt form) runs it after unshare and before pivot_root. Each step has a verb_object
``name`` that becomes the ``step`` of the setup_error record when it fails.

The filesystem rule (``sandbox_paths`` says which host paths, ``build_plan`` mounts them):

* ``/`` is the image under a throwaway writable layer (image "host": the host's directories);
* ``/tmp``, ``/var/tmp``, ``/run``, ``/dev/shm`` are fresh, empty directories (FRESH_DIRS), whatever
  the image, of the sandbox's scratch tmpfs, which also holds every writable layer: one size
  bound (the ``disk`` limit) covers everything the sandbox writes outside basetemp;
* the rootdir and the current directory are the host's, each under a throwaway writable layer of
  its own, wherever they live and whatever the image;
* pytest's basetemp is the host's, read-write: what a test writes there survives;
* the interpreter's directories are the host's, read-only (a non-host image) or as in the host's tree;
* ids: root inside is the user running pytest; only that user's id is mapped. Files of other users
  show as owned by nobody: readable, not changeable (EACCES). Rootless with image "host", the
  caller's home gets a throwaway overlay of its own too: a copy-up inside an overlay of /home would
  have to copy /home, whose owner (root) the sandbox cannot map (EOVERFLOW). For the same reason
  /var/tmp (world-writable, root's) is fresh like /tmp.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import socket
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, Protocol

from . import _linux as L

HOSTNAME: Final = "nsbox"
ROOT_SOURCE: Final = "nsbox-root"  # the source name of the sandbox's "/" mount; C checks it
REPLACED_TOP_LEVEL: Final = frozenset({"proc", "sys", "dev", "tmp", "run"})
FRESH_DIRS: Final = ("/tmp", "/var/tmp", "/run", "/dev/shm")  # empty in every sandbox (see the module doc)
# What the host's kernel shows in /proc and /sys that a test has no business with (runc's and
# Docker's default maskedPaths and readonlyPaths, plus /proc/kmsg): masked paths show an empty
# read-only file or directory, read-only paths show the kernel's but cannot be written. Paths
# this kernel lacks are skipped. /proc/sys is read-only too (its own step, for every sandbox).
MASKED_PROC_PATHS: Final = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/kmsg",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
)
READONLY_PROC_PATHS: Final = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sysrq-trigger")
MASKED_SYS_PATHS: Final = ("/sys/firmware", "/sys/devices/virtual/powercap")
# network="host" binds the host's /sys, cgroup hierarchies included: hidden as in a fresh sysfs
MASKED_HOST_SYS_PATHS: Final = ("/sys/fs/cgroup",)
DEV_NODES: Final = ("null", "zero", "full", "random", "urandom", "tty")
MAX_SYMLINK_HOPS: Final = 40
SCRATCH_PREFIX: Final = "pytest-nsbox-"  # + "<pid>-": the mount point of a sandbox's scratch tmpfs
# An address per family for the loopback of network="none" (see AddLoopbackAddresses): one
# more loopback address for IPv4 (127/8 is local already), a documentation /128 for IPv6.
LOOPBACK_EXTRA_ADDRESSES: Final = {
    int(socket.AF_INET): ("127.0.0.2", 8, L.RT_SCOPE_HOST),
    int(socket.AF_INET6): ("2001:db8::1", 128, L.RT_SCOPE_UNIVERSE),
}


class Step(Protocol):
    @property
    def name(self) -> str: ...

    def run(self) -> None: ...


def escape_overlay_path(path: str) -> str:
    """Escape the characters overlayfs treats specially in lowerdir/upperdir lists."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def _b(path: str | Path) -> bytes:
    return os.fsencode(path)


# --- scratch mount points ------------------------------------------------------------------


def make_scratch_dir() -> str:
    """An empty directory for the scratch tmpfs of this process's sandboxes (each mounts its own
    there, in its own mount namespace); empty ones left by killed processes are removed first."""
    import tempfile  # lazy, like every import the builder's sandboxes do not need: it forks them

    tmpdir = tempfile.gettempdir()
    sweep_stale_scratch_dirs(tmpdir)
    return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=tmpdir)


@contextlib.contextmanager
def scratch_dir() -> Iterator[str]:
    """make_scratch_dir() for one sandbox, removed afterwards."""
    path = make_scratch_dir()
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def sweep_stale_scratch_dirs(tmpdir: str) -> None:
    """Remove empty scratch mount points left by processes that were killed."""
    uid = os.getuid()
    try:
        entries = list(os.scandir(tmpdir))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(SCRATCH_PREFIX):
            continue
        pid_text = entry.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or os.path.exists(f"/proc/{pid_text}"):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid == uid:
                os.rmdir(entry.path)  # rmdir only: it is empty unless it is not ours
        except OSError:
            pass


# --- mount table -------------------------------------------------------------------------


def _unescape_mountinfo(field_text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field_text):
        if field_text[i] == "\\" and i + 3 < len(field_text) + 1 and field_text[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_text[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class MountTable:
    """The mount points of a mount namespace, from ``/proc/self/mountinfo``."""

    mount_points: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> MountTable:
        points = {_unescape_mountinfo(line.split()[4]) for line in text.splitlines() if line.strip()}
        return cls(tuple(sorted(points)))

    @classmethod
    def read(cls) -> MountTable:
        return cls.parse(Path("/proc/self/mountinfo").read_text())

    def below(self, path: str) -> list[str]:
        """Mount points strictly below *path*."""
        prefix = path.rstrip("/") + "/"
        return [p for p in self.mount_points if p.startswith(prefix)]


def locked_flags(path: str) -> int:
    """The mount flags of the mount holding *path* that a remount inside a user namespace must keep."""
    st_flags = os.statvfs(path).f_flag
    return sum(ms for st, ms in L.ST_TO_MS.items() if st_flags & st)


# --- steps -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MakeRootSlave:
    """Stop our mounts from propagating to the host (runc: MS_SLAVE, not MS_PRIVATE)."""

    name: str = "make_root_slave"

    def run(self) -> None:
        L.mount(None, b"/", None, L.MS_REC | L.MS_SLAVE)


@dataclass(frozen=True, slots=True)
class MountFs:
    """Mount a fresh filesystem instance (tmpfs, proc, sysfs, devpts)."""

    name: str
    fstype: str
    target: str
    flags: int = 0
    data: str | None = None
    source: str | None = None
    root: str | None = None  # set: *target* is a path inside this root, resolved as make_path_in_root does

    def run(self) -> None:
        if self.root is not None:
            target = make_path_in_root(self.root, self.target, directory=True)
        else:
            os.makedirs(self.target, exist_ok=True)
            target = _b(self.target)
        data = self.data.encode() if self.data else None
        L.mount(_b(self.source or self.fstype), target, self.fstype.encode(), self.flags, data)


@dataclass(frozen=True, slots=True)
class BindDiskScratch:
    """The sandbox's scratch on the host's disk (``scratch="disk"``): *source*, a directory P
    made for this one sandbox (the plan is shared: ``with_scratch_source`` fills it in), bound on
    *target* in place of the scratch tmpfs, nosuid and nodev as the tmpfs is."""

    target: str
    source: str | None = None
    name: str = "mount_scratch_dir"

    def run(self) -> None:
        if self.source is None:
            raise OSError(errno.EINVAL, f"{self.name}: no directory on disk was made for this sandbox")
        os.chmod(self.source, 0o755)
        L.mount(_b(self.source), _b(self.target), None, L.MS_BIND)
        flags = locked_flags(self.target) | L.MS_NOSUID | L.MS_NODEV
        L.mount(None, _b(self.target), None, L.MS_BIND | L.MS_REMOUNT | flags)


SCRATCH_STEPS: Final = ("mount_scratch_tmpfs", "mount_scratch_dir")  # the step that makes the scratch


def with_scratch_source(steps: Sequence[Step], source: str | None) -> tuple[Step, ...]:
    """*steps* with the disk scratch's directory (*source*) filled in, if the plan has one."""
    if source is None:
        return tuple(steps)
    return tuple(BindDiskScratch(step.target, source) if isinstance(step, BindDiskScratch) else step for step in steps)


@dataclass(frozen=True, slots=True)
class BindScratchDir:
    """A fresh directory of the scratch tmpfs at *target* (itself, if *target* is *source*): every
    such place shares the scratch's one size bound, the sandbox's ``disk`` limit."""

    name: str
    source: str  # a new directory on the scratch tmpfs
    target: str
    mode: int
    root: str | None = None  # set: *target* is a path inside this root, resolved as make_path_in_root does

    def run(self) -> None:
        os.makedirs(self.source, exist_ok=True)
        os.chmod(self.source, self.mode)
        if self.root is not None:
            target = make_path_in_root(self.root, self.target, directory=True)
        else:
            os.makedirs(self.target, exist_ok=True)
            target = _b(self.target)
        L.mount(_b(self.source), target, None, L.MS_BIND)


@dataclass(frozen=True, slots=True)
class MakeTree:
    """Create directories, files and symlinks on a filesystem the sandbox owns (scratch, /dev)."""

    name: str
    dirs: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    symlinks: tuple[tuple[str, str], ...] = ()  # (link path, link target)
    modes: tuple[tuple[str, int], ...] = ()  # directories created with an exact mode

    def run(self) -> None:
        for path in self.dirs:
            os.makedirs(path, exist_ok=True)
        for path, mode in self.modes:
            os.mkdir(path)
            os.chmod(path, mode)
        for path, content in self.files:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as handle:
                handle.write(content)
        for path, target in self.symlinks:
            os.symlink(target, path)


@dataclass(frozen=True, slots=True)
class MakeLinks:
    """Create symlinks at paths inside *root* (their parents resolved as make_path_in_root does)."""

    root: str
    symlinks: tuple[tuple[str, str], ...]  # (link path inside root, link target)
    name: str = "make_links"

    def run(self) -> None:
        for path, target in self.symlinks:
            parent = make_path_in_root(self.root, posixpath.dirname(path), directory=True)
            os.symlink(target, os.path.join(parent, _b(posixpath.basename(path))))


@dataclass(frozen=True, slots=True)
class MountOverlay:
    """Overlay *lowers* (top first) with a writable upper layer on the scratch tmpfs."""

    target: str
    lowers: tuple[str, ...]
    upper: str
    work: str
    source: str = "nsbox-overlay"
    name: str = "mount_overlay"
    cwd: str | None = None  # relative lowers are resolved here (mount(2) takes one page of options)
    root: str | None = None  # set: *target* is a path inside this root, resolved as make_path_in_root does

    @property
    def options(self) -> str:
        lowerdir = ":".join(escape_overlay_path(p) for p in self.lowers)
        # xino=on: inode numbers from readdir and stat agree (the upper layer is a tmpfs, the lower
        # ones another filesystem); the kernel turns it off where the inode numbers do not fit.
        upper, work = escape_overlay_path(self.upper), escape_overlay_path(self.work)
        return f"lowerdir={lowerdir},upperdir={upper},workdir={work},userxattr,xino=on"

    def run(self) -> None:
        for path in (self.upper, self.work):
            os.makedirs(path, exist_ok=True)
        if self.root is not None:
            target = make_path_in_root(self.root, self.target, directory=True)
        else:
            os.makedirs(self.target, exist_ok=True)
            target = _b(self.target)
        if self.cwd is not None:
            os.chdir(self.cwd)
        L.mount(_b(self.source), target, b"overlay", 0, self.options.encode())


@dataclass(frozen=True, slots=True)
class BindMount:
    """Bind a host path into the new root; read-only binds re-mount every submount read-only.

    ``remounts`` pairs each mount below *source* (relative, "" for the top) with the flags a
    remount must keep (locked flags of the source mounts in a user namespace).
    """

    source: str
    root: str
    path: str  # absolute path inside the new root
    readonly: bool
    remounts: tuple[tuple[str, int], ...] = ()
    name: str = "bind_host_path"

    def run(self) -> None:
        is_dir = os.path.isdir(self.source)
        target = make_path_in_root(self.root, self.path, directory=is_dir)
        L.mount(_b(self.source), target, None, L.MS_BIND | L.MS_REC)
        if self.readonly:
            for relative, flags in self.remounts:
                sub = target + _b(relative)
                L.mount(None, sub, None, L.MS_BIND | L.MS_REMOUNT | L.MS_RDONLY | flags)


@dataclass(frozen=True, slots=True)
class BindProc:
    """Bind the /proc mounted for the sandbox's PID namespace before the user namespace was entered.

    A process may mount a proc only with CAP_SYS_ADMIN over the user namespace that owns the PID
    namespace; in a prebuilt sandbox that is the builder's, not the sandbox's own.
    """

    target: str
    name: str = "mount_proc"

    def run(self) -> None:
        os.makedirs(self.target, exist_ok=True)
        L.mount(b"/proc", _b(self.target), None, L.MS_BIND)


@dataclass(frozen=True, slots=True)
class RemountReadonly:
    """Make a path inside the new root read-only (``/proc/sys``): a bind of itself, re-mounted read-only.

    *missing_ok*: a path this kernel lacks (``/proc/sysrq-trigger`` without CONFIG_MAGIC_SYSRQ) is skipped.
    """

    target: str
    flags: int = 0
    name: str = "remount_readonly"
    missing_ok: bool = False

    def run(self) -> None:
        if self.missing_ok and not os.path.lexists(self.target):
            return
        L.mount(_b(self.target), _b(self.target), None, L.MS_BIND | L.MS_REC)
        L.mount(None, _b(self.target), None, L.MS_BIND | L.MS_REMOUNT | L.MS_RDONLY | self.flags)


MASK_FILE: Final = "file"  # in MaskPath.sources: an empty file and an empty directory, made by make_mask_sources
MASK_DIR: Final = "dir"
MASK_FLAGS: Final = L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC


@dataclass(frozen=True, slots=True)
class MaskPath:
    """Hide a path of /proc or /sys (runc's maskedPaths): an empty read-only file is bound over a
    file, an empty read-only directory over a directory (both on the scratch tmpfs, out of the
    new root's reach). Reading gives nothing, writing EROFS. A path this kernel lacks is skipped.
    """

    name: str
    target: str
    sources: str  # the directory holding MASK_FILE and MASK_DIR

    def run(self) -> None:
        try:
            mode = os.lstat(self.target).st_mode
        except FileNotFoundError:
            return
        source = os.path.join(self.sources, MASK_DIR if stat.S_ISDIR(mode) else MASK_FILE)
        L.mount(_b(source), _b(self.target), None, L.MS_BIND)
        L.mount(None, _b(self.target), None, L.MS_BIND | L.MS_REMOUNT | L.MS_RDONLY | MASK_FLAGS)


def _step_name(verb: str, path: str) -> str:
    """``mask_proc_kcore`` for ("mask", "/proc/kcore"): the step's name in a setup error."""
    return f"{verb}_" + path.strip("/").replace("/", "_").replace("-", "_")


def kernel_interface_steps(
    root: str, scratch: str, paths: Iterable[str], *, readonly: Iterable[str] = (), flags: int = 0
) -> list[Step]:
    """Steps that make *readonly* read-only and mask *paths* (paths inside the new *root*)."""
    sources = f"{scratch}/masked"
    steps: list[Step] = [RemountReadonly(f"{root}{p}", flags, _step_name("readonly", p), missing_ok=True) for p in readonly]
    steps += [MaskPath(_step_name("mask", p), f"{root}{p}", sources) for p in paths]
    return steps


@dataclass(frozen=True, slots=True)
class BindDevNodes:
    """Populate the sandbox's /dev tmpfs with bind mounts of the host's harmless device nodes."""

    dev: str
    nodes: tuple[str, ...] = DEV_NODES
    name: str = "mount_minimal_dev"

    def run(self) -> None:
        for node in self.nodes:
            target = f"{self.dev}/{node}"
            with open(target, "w"):
                pass
            L.mount(_b(f"/dev/{node}"), _b(target), None, L.MS_BIND)


@dataclass(frozen=True, slots=True)
class PivotRoot:
    """Make *root* the new "/" and detach the old root (pivot_root(".", "."), see pivot_root(2))."""

    root: str
    name: str = "pivot_root"

    def run(self) -> None:
        os.chdir(self.root)
        L.pivot_root(b".", b".")
        L.umount2(b".", L.MNT_DETACH)
        os.chdir("/")


@dataclass(frozen=True, slots=True)
class SetHostname:
    hostname: str = HOSTNAME
    name: str = "set_hostname"

    def run(self) -> None:
        L.sethostname(self.hostname.encode())


@dataclass(frozen=True, slots=True)
class BringUpLoopback:
    name: str = "bring_up_loopback"

    def run(self) -> None:
        L.set_interface_up("lo")


@dataclass(frozen=True, slots=True)
class AddLoopbackAddresses:
    """Give the sandbox's ``lo`` an address of each family in *families*, so that glibc's
    AI_ADDRCONFIG answers for that family as it does on the host.

    glibc (check_pf) counts a family as configured only for an address other than 127.0.0.1
    and ::1; with only those, ``getaddrinfo("localhost", ..., AF_INET, flags=AI_ADDRCONFIG)``
    fails. The addresses added here (LOOPBACK_EXTRA_ADDRESSES) reach nothing outside: no route
    leaves the namespace. A family the sandbox's kernel refuses (IPv6 disabled) is left out.
    """

    families: tuple[int, ...]
    name: str = "add_loopback_addresses"

    def run(self) -> None:
        for family in self.families:
            address, prefixlen, scope = LOOPBACK_EXTRA_ADDRESSES[family]
            try:
                L.add_address("lo", family, address, prefixlen, scope)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAFNOSUPPORT):
                    raise


def make_path_in_root(root: str, path: str, *, directory: bool) -> bytes:
    """Create *path* inside *root* (dirs, and a file at the end unless *directory*).

    Symlinks met on the way are resolved as if *root* were "/", so an image's absolute
    symlink can never send a mount point out to the host's tree.
    """
    parts = [p for p in path.split("/") if p and p != "."]
    current: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if current:
                current.pop()
            continue
        candidate = os.path.join(root, *current, part)
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            if parts or directory:
                os.mkdir(candidate, 0o755)
            else:
                with open(candidate, "w"):
                    pass
            current.append(part)
            continue
        if stat.S_ISLNK(mode):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise OSError(errno.ELOOP, f"too many symbolic links resolving {path!r} in {root}")
            link = os.readlink(candidate)
            if link.startswith("/"):
                current = []
            parts = [p for p in link.split("/") if p and p != "."] + parts
            continue
        current.append(part)
    return _b(os.path.join(root, *current))


# --- plan --------------------------------------------------------------------------------


Access = Literal["read-only", "shared", "throwaway"]
READ_ONLY: Final = "read-only"  # a read-only bind
SHARED: Final = "shared"  # a read-write bind: writes reach the host
THROWAWAY: Final = "throwaway"  # an overlay of its own: writable, writes are discarded
_ACCESS_RANK: Final = {THROWAWAY: 0, SHARED: 1, READ_ONLY: 2}


@dataclass(frozen=True, slots=True)
class HostPath:
    """A host path the test sees inside (interpreter, site-packages, rootdir, cwd, basetemp)."""

    path: str
    access: Access

    @property
    def readonly(self) -> bool:
        return self.access == READ_ONLY


def sandbox_paths(
    *,
    interpreter: Iterable[str],
    rootdir: str,
    cwd: str,
    basetemp: str | None,
    home: str | None = None,
) -> list[HostPath]:
    """The host paths of the filesystem rule (module doc): the interpreter's read-only, the
    rootdir and the cwd throwaway, basetemp shared; *home* (rootless, image "host") throwaway.

    "/" and the fresh directories themselves are never taken from the host (the cwd "/tmp" is
    the sandbox's empty /tmp).
    """
    paths = [HostPath(p, READ_ONLY) for p in interpreter]
    for path in (rootdir, cwd, home):
        if path and _host_can_give(path):
            paths.append(HostPath(path, THROWAWAY))
    if basetemp:
        paths.append(HostPath(basetemp, SHARED))
    return paths


def _host_can_give(path: str) -> bool:
    """Whether *path* can come from the host: not "/", not a fresh directory, not in /proc, /sys, /dev."""
    if path.rstrip("/") in ("", *FRESH_DIRS):
        return False
    return path.split("/")[1] not in ("proc", "sys", "dev")


def under_fresh_or_replaced(path: str) -> bool:
    """Whether the host image's tree hides *path* (it is under a fresh or replaced directory)."""
    if path.split("/")[1] in REPLACED_TOP_LEVEL:
        return True
    return any(path == d or path.startswith(d + "/") for d in FRESH_DIRS)


@dataclass(frozen=True, slots=True)
class MountPlan:
    scratch: str
    root: str
    steps: tuple[Step, ...]
    host_paths: tuple[HostPath, ...] = ()  # what build_plan was given (--nsbox-keep records them)
    on_disk: bool = False  # the scratch is a host directory made per sandbox (BindDiskScratch), not a tmpfs


@dataclass
class _PlanWriter:
    scratch: str
    mounts: MountTable
    steps: list[Step] = field(default_factory=list)
    layers: int = 0
    kept: str | None = None  # a kept writable layer (nsbox shell --kept): the top lower layer of every overlay

    def kept_layer(self, path: str) -> str | None:
        """The kept layer's directory at sandbox *path*, if it has one."""
        if self.kept is None:
            return None
        candidate = os.path.join(self.kept, path.lstrip("/"))
        return candidate if os.path.isdir(candidate) and not os.path.islink(candidate) else None

    @property
    def root(self) -> str:
        return f"{self.scratch}/root"

    def overlay(
        self,
        target: str,
        lowers: Sequence[str],
        source: str = "nsbox-overlay",
        cwd: str | None = None,
        *,
        inside: bool = False,
    ) -> None:
        """An overlay on *target* (*inside*: a path inside the new root, resolved there)."""
        self.layers += 1
        upper, work = f"{self.scratch}/upper/{self.layers}", f"{self.scratch}/work/{self.layers}"
        root = self.root if inside else None
        kept = self.kept_layer(target if inside else "/" + target[len(self.root) :].lstrip("/"))
        if kept is not None:
            lowers = [kept, *lowers]
        self.steps.append(MountOverlay(target, tuple(lowers), upper, work, source, cwd=cwd, root=root))

    def fresh_dir(self, step: BindScratchDir) -> list[Step]:
        """*step* (a fresh directory of the scratch tmpfs); with a kept layer that has that
        directory, an overlay of it with a new writable layer (its mode as the fresh one's)."""
        inside = step.target if step.root is not None else "/" + step.target[len(self.root) :].lstrip("/")
        kept = self.kept_layer(inside)
        if kept is None:
            return [step]
        upper, work = f"{self.scratch}/upper/{step.name}", f"{self.scratch}/work/{step.name}"
        overlay = MountOverlay(step.target, (kept,), upper, work, name=step.name, root=step.root)
        return [MakeTree(step.name, modes=((upper, step.mode),)), overlay]

    def throwaway(self, host_path: str) -> None:
        """*host_path* at the same path inside, under a writable layer of its own.

        Overlayfs refuses a lower directory with mounts below it in a user namespace (EINVAL):
        such a directory becomes a tmpfs holding the same entries, its subdirectories overlaid
        one by one (the same again for those holding mounts), its files bound read-only.
        """
        if not self.mounts.below(host_path):
            self.overlay(host_path, [host_path], inside=True)
            return
        self.layers += 1
        holder = f"{self.scratch}/dirs/{self.layers}"
        self.steps.append(BindScratchDir("mount_host_path_dir", holder, host_path, 0o755, self.root))
        symlinks: list[tuple[str, str]] = []
        for entry in sorted(os.scandir(host_path), key=lambda e: e.name):
            inside = f"{host_path.rstrip('/')}/{entry.name}"
            if entry.is_symlink():
                symlinks.append((inside, os.readlink(entry.path)))
            elif entry.is_dir(follow_symlinks=False):
                self.throwaway(inside)
            elif entry.is_file(follow_symlinks=False):
                self.bind(entry.path, inside, readonly=True)
        if symlinks:
            self.steps.append(MakeLinks(self.root, tuple(symlinks)))

    def bind(self, source: str, path: str, readonly: bool) -> None:
        remounts: tuple[tuple[str, int], ...] = ()
        if readonly:
            subs = [(sub[len(source.rstrip("/")) :], locked_flags(sub)) for sub in self.mounts.below(source)]
            remounts = (("", locked_flags(source)), *subs)
        self.steps.append(BindMount(source, self.root, path, readonly, remounts))

    def host_tree(self, host_dir: str, target: str, init_dir: str | None) -> None:
        """Overlay each entry of *host_dir*; directories holding submounts are rebuilt one level down."""
        start = len(self.steps)
        dirs: list[str] = []
        symlinks: list[tuple[str, str]] = []
        empty: list[tuple[str, int]] = []  # an empty directory needs no overlay: a directory on the root tmpfs
        for entry in sorted(os.scandir(host_dir), key=lambda e: e.name):
            host_path = entry.path if host_dir != "/" else f"/{entry.name}"
            dest = f"{target}/{entry.name}"
            if host_dir == "/" and entry.name in REPLACED_TOP_LEVEL:
                continue
            if entry.is_symlink():
                symlinks.append((dest, os.readlink(host_path)))
            elif entry.is_dir(follow_symlinks=False):
                if self.mounts.below(host_path):
                    dirs.append(dest)
                    self.host_tree(host_path, dest, None)
                elif _is_empty_dir(host_path) and host_path not in self.mounts.mount_points:
                    empty.append((dest, stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)))
                else:
                    init = f"{init_dir}/{entry.name}" if init_dir and entry.name == "etc" else None
                    self.overlay(dest, [init, host_path] if init else [host_path])
            elif entry.is_file(follow_symlinks=False):
                self.bind(host_path, dest[len(self.root) :], readonly=True)
        self.steps.insert(start, MakeTree("make_host_tree", dirs=tuple(dirs), symlinks=tuple(symlinks), modes=tuple(empty)))


def _is_empty_dir(path: str) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False  # unreadable: let the overlay show what the caller may see


def init_layer_files(network: str, host_resolv_conf: str, image_hosts: str | None = None) -> dict[str, str]:
    """The init layer (Docker's term): per-sandbox /etc/hostname, /etc/hosts, /etc/resolv.conf.

    /etc/hosts is the image's own (*image_hosts*) plus a line for the sandbox's hostname, so
    that names resolve as on the machine the image comes from; generated only for an image
    without one.
    """
    resolv = host_resolv_conf if network == "host" else f"# nsbox: network={network!r}, no name servers\n"
    return {"etc/hostname": f"{HOSTNAME}\n", "etc/hosts": hosts_file(image_hosts), "etc/resolv.conf": resolv}


def hosts_file(image_hosts: str | None) -> str:
    """The sandbox's /etc/hosts: *image_hosts* (the image's) with the sandbox's hostname added
    unless it names it already; a generated one when the image has none."""
    if image_hosts is None:
        return f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{HOSTNAME}\n"
    names = {name for line in image_hosts.splitlines() for name in line.split("#", 1)[0].split()[1:]}
    if HOSTNAME in names:
        return image_hosts
    separator = "" if not image_hosts or image_hosts.endswith("\n") else "\n"
    return f"{image_hosts}{separator}127.0.1.1\t{HOSTNAME}\n"


HOSTS: Final = "etc/hosts"

OPAQUE_XATTRS: Final = ("trusted.overlay.opaque", "user.overlay.opaque")


def read_image_file(image: str | tuple[str, ...], path: str, hops: int = 0) -> str | None:
    """The text of *path* in *image* as the sandbox will see it, or None if that is no regular
    file. "host" is the host's "/", a tuple is overlay layers (top first: whiteouts and opaque
    directories hide what is below). Symlinks resolve inside the image, never to the host."""
    layers = ("/",) if image == "host" else (image,) if isinstance(image, str) else image
    parts = [p for p in posixpath.normpath("/" + path).split("/") if p]
    for layer in layers:
        current = layer
        for index, part in enumerate(parts):
            current = os.path.join(current, part)
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                break  # not in this layer: look below
            except OSError:
                return None
            rest = parts[index + 1 :]
            if stat.S_ISLNK(st.st_mode):
                if hops >= MAX_SYMLINK_HOPS:
                    return None
                target = posixpath.join("/", *parts[:index], os.readlink(current), *rest)
                return read_image_file(image, target, hops + 1)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return None  # a whiteout
            if not rest and stat.S_ISREG(st.st_mode):
                try:
                    with open(current, encoding="utf-8", errors="surrogateescape") as handle:
                        return handle.read()
                except OSError:
                    return None
            if not rest or not stat.S_ISDIR(st.st_mode):
                return None
            if len(layers) > 1 and _is_opaque(current):
                return read_image_file(current, "/".join(rest), hops)  # it hides the layers below
    return None


def _is_opaque(directory: str) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(directory, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _covers(outer: HostPath, inner: HostPath) -> bool:
    """Whether mounting *outer* already gives *inner*: same access, or a throwaway overlay over a
    read-only path (it shows the same files)."""
    if not (inner.path == outer.path or inner.path.startswith(outer.path.rstrip("/") + "/")):
        return False
    return outer.access == inner.access or (outer.access == THROWAWAY and inner.access == READ_ONLY)


def _minimal_paths(paths: Iterable[HostPath]) -> list[HostPath]:
    """Drop paths already covered by a shorter one (see _covers); sort by depth, so that a deeper
    mount goes on top of a shallower one."""
    chosen: list[HostPath] = []
    for hp in sorted(set(paths), key=lambda p: (p.path.count("/"), p.path, _ACCESS_RANK[p.access])):
        if not any(_covers(c, hp) for c in chosen):
            chosen.append(hp)
    return chosen


MAX_OPTIONS: Final = 4000  # mount(2) silently truncates its data at one page (4096 bytes)
OPTIONS_RESERVE: Final = 512  # room in that page for upperdir, workdir and the flags
RESOLV_CONF: Final = "/etc/resolv.conf"


def read_resolv_conf() -> str:
    """The host's resolv.conf for the init layer of network="host" ("" if it has none)."""
    try:
        return Path(RESOLV_CONF).read_text()
    except OSError:
        return ""


def configured_families() -> tuple[int, ...]:
    """The address families glibc's AI_ADDRCONFIG counts as configured in the caller's network
    namespace, asked of glibc itself: it checks them before it parses even a numeric host."""
    families = []
    for family, loopback in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            socket.getaddrinfo(loopback, None, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG | socket.AI_NUMERICHOST)
        except (socket.gaierror, OSError):
            continue
        families.append(family)
    return tuple(families)


def short_lowers(lowers: Sequence[str], links_root: str) -> tuple[str | None, tuple[str, ...]]:
    """(cwd, lowers) whose option string fits one page: a directory of numbered symlinks when needed."""
    if sum(len(escape_overlay_path(p)) + 1 for p in lowers) < MAX_OPTIONS - OPTIONS_RESERVE:
        return None, tuple(lowers)
    import hashlib
    import shutil
    import tempfile

    key = hashlib.sha256("\0".join(lowers).encode()).hexdigest()[:32]
    farm = os.path.join(links_root, key)
    if not os.path.isdir(farm):
        os.makedirs(links_root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=links_root)
        for index, path in enumerate(lowers):
            os.symlink(path, os.path.join(tmp, str(index)))
        try:
            os.rename(tmp, farm)
        except OSError:
            shutil.rmtree(tmp)  # another process published the same farm first
    return farm, tuple(str(i) for i in range(len(lowers)))


def build_plan(
    *,
    image: str | tuple[str, ...],
    network: str,
    scratch: str,
    host_paths: Iterable[HostPath],
    mounts: MountTable,
    host_resolv_conf: str | None = None,
    stacks_dir: str | None = None,
    address_families: tuple[int, ...] | None = None,
    fresh_var_tmp: bool = True,
    disk: int | None = None,
    kept: str | None = None,
    on_disk: bool = False,
) -> MountPlan:
    """Build every mount step for one sandbox, by the filesystem rule of the module doc.
    ``image`` is "host", a rootfs directory, or layer directories (top first); ``host_paths``
    come from sandbox_paths. ``host_resolv_conf`` defaults to the host's (read_resolv_conf).

    ``address_families`` (network="none"): the families the sandbox's loopback gets an address
    of, so that name resolution answers as on the host; default: configured_families().
    ``fresh_var_tmp=False`` (a recipe's run step): /var/tmp is the image's, part of the layer.

    ``disk``: the size of the scratch tmpfs, which holds every place the sandbox can write (the
    writable layers, ``/tmp``, ``/var/tmp``, ``/run``, ``/dev``, ``/dev/shm``, the root of image
    "host"): one bound for all of them (None: the kernel's default, half of the RAM).
    ``on_disk``: no tmpfs; a directory on the host's disk, made per sandbox, is bound there
    instead (BindDiskScratch; *disk* is then P's to enforce, see box/diskscratch.py).

    ``kept``: a kept writable layer, extracted (``nsbox shell --kept``): it lies over the image
    in every overlay and under the fresh directories, each under a new writable layer.
    """
    host_paths = tuple(host_paths)
    b = _PlanWriter(scratch, mounts, kept=kept)
    root, init = b.root, f"{scratch}/init"
    resolv = read_resolv_conf() if host_resolv_conf is None else host_resolv_conf
    hosts = read_image_file(image, HOSTS)
    init_files = tuple((f"{init}/{name}", text) for name, text in init_layer_files(network, resolv, hosts).items())
    scratch_options = "mode=0755" + (f",size={disk}" if disk is not None else "")
    fresh_dir = f"{scratch}/fresh"
    # its source names the sandbox's "/" too: for image "host" that is a directory of it
    scratch_step: Step = (
        BindDiskScratch(scratch)
        if on_disk
        else MountFs("mount_scratch_tmpfs", "tmpfs", scratch, L.MS_NOSUID | L.MS_NODEV, scratch_options, ROOT_SOURCE)
    )
    head: list[Step] = [
        MakeRootSlave(),
        scratch_step,
        MakeTree("write_init_layer", dirs=(f"{scratch}/upper", f"{scratch}/work", f"{scratch}/empty"), files=init_files),
    ]
    if image == "host":
        if on_disk:  # "/" is a mount of its own, "nsbox-root" (require_sandbox, verify_inside): an overlay
            upper, work = f"{scratch}/upper/root", f"{scratch}/work/root"
            head.append(MountOverlay(root, (f"{scratch}/empty",), upper, work, ROOT_SOURCE, name="mount_root_dir"))
        else:
            head.append(BindScratchDir("mount_root_dir", root, root, 0o755))  # a mount point, for pivot_root
        b.host_tree("/", root, init)
        visible = [hp for hp in host_paths if under_fresh_or_replaced(hp.path) or not hp.readonly]
    elif isinstance(image, tuple):
        cwd, lowers = short_lowers(image, stacks_dir or os.path.join(scratch, "stacks"))
        b.overlay(root, [init, *lowers], source=ROOT_SOURCE, cwd=cwd)
        visible = list(host_paths)
    else:
        b.overlay(root, [init, image], source=ROOT_SOURCE)
        visible = list(host_paths)
    image_steps = list(b.steps)
    b.steps.clear()
    fresh: list[Step] = [
        *b.fresh_dir(BindScratchDir("mount_tmp", f"{fresh_dir}/tmp", f"{root}/tmp", 0o1777)),
        *b.fresh_dir(BindScratchDir("mount_run", f"{fresh_dir}/run", f"{root}/run", 0o755)),
        BindScratchDir("mount_minimal_dev", f"{fresh_dir}/dev", f"{root}/dev", 0o755),
        BindDevNodes(f"{root}/dev"),
        MountFs("mount_devpts", "devpts", f"{root}/dev/pts", L.MS_NOSUID | L.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620"),
        *b.fresh_dir(BindScratchDir("mount_dev_shm", f"{fresh_dir}/shm", f"{root}/dev/shm", 0o1777)),
        MakeTree(
            "link_dev",
            symlinks=(
                (f"{root}/dev/ptmx", "pts/ptmx"),
                (f"{root}/dev/fd", "/proc/self/fd"),
                (f"{root}/dev/stdin", "/proc/self/fd/0"),
                (f"{root}/dev/stdout", "/proc/self/fd/1"),
                (f"{root}/dev/stderr", "/proc/self/fd/2"),
            ),
        ),
    ]
    for hp in _minimal_paths(visible):  # shallow first: a deeper one goes on top
        if hp.access == THROWAWAY:
            b.throwaway(hp.path)
        else:
            b.bind(hp.path, hp.path, hp.readonly)
    if fresh_var_tmp:
        fresh[1:1] = b.fresh_dir(BindScratchDir("mount_var_tmp", f"{fresh_dir}/var-tmp", "/var/tmp", 0o1777, root))
    proc_flags = L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC
    tail: list[Step] = [
        # /proc is mounted while the old root is still attached (EPERM after, in a user namespace)
        MountFs("mount_proc", "proc", f"{root}/proc", proc_flags),
        RemountReadonly(f"{root}/proc/sys", proc_flags),
        MakeTree("make_mask_sources", dirs=(f"{scratch}/masked/{MASK_DIR}",), files=((f"{scratch}/masked/{MASK_FILE}", ""),)),
        *kernel_interface_steps(root, scratch, MASKED_PROC_PATHS, readonly=READONLY_PROC_PATHS, flags=proc_flags),
    ]
    masked_sys: tuple[str, ...] = MASKED_SYS_PATHS
    if network != "host":  # a network namespace of its own
        tail.append(MountFs("mount_sysfs", "sysfs", f"{root}/sys", proc_flags | L.MS_RDONLY))
    else:
        binder = _PlanWriter(scratch, mounts)
        binder.bind("/sys", "/sys", readonly=True)
        tail.extend(binder.steps)
        masked_sys += MASKED_HOST_SYS_PATHS
    tail += kernel_interface_steps(root, scratch, masked_sys)
    tail += [PivotRoot(root), SetHostname()]
    if network != "host":
        families = configured_families() if address_families is None else address_families
        tail.append(BringUpLoopback())
        if families:
            tail.append(AddLoopbackAddresses(tuple(int(f) for f in families)))
    return MountPlan(scratch, root, (*head, *image_steps, *fresh, *b.steps, *tail), host_paths, on_disk)
