"""Keeping a sandbox's writable layers: where they are on its scratch tmpfs, and copying them out.

Every place a sandbox can write is a directory of its one scratch tmpfs (see mounts.py): the
upper layer of each overlay (the root's, the rootdir's, ...), and the fresh ``/tmp``, ``/var/tmp``,
``/run``, ``/dev/shm``. The sandbox's PID 1 (B', prebuilt form) keeps a descriptor of the scratch
tmpfs open (``mount_scratch_tmpfs``), so when the test is over and before P kills B', P reaches
those directories through ``/proc/<pid of B'>/fd/<n>`` (a ptrace read check: P is the same user
as B', which stays dumpable, and owns its user namespaces) and writes them to one tar file in the
OCI layer format: paths as the sandbox saw them, ``.wh.NAME`` for a whiteout (a 0/0 character
device in the upper layer), ``.wh..wh..opq`` in an opaque directory, owners as ids inside the
sandbox. No mknod, no special permission on the host: the kept layer is an ordinary file.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from .mounts import OPAQUE_XATTRS, REPLACED_TOP_LEVEL, BindScratchDir, MakeTree, MountOverlay, MountPlan

WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"
NOBODY: Final = 65534  # what an id the sandbox does not map shows as inside
NOT_KEPT_NAMES: Final = ("mount_minimal_dev",)  # /dev: the sandbox's own nodes and links, nothing of the test


class LayerTooLarge(Exception):
    """The writable layer is bigger than the size left for kept layers."""


@dataclass(frozen=True, slots=True)
class KeptSource:
    """One writable directory of the scratch tmpfs and where the sandbox showed it."""

    path: str  # inside the sandbox: "/", "/tmp", "/work/project"
    scratch: str  # relative to the scratch tmpfs: "upper/1", "fresh/tmp"
    lowers: tuple[str, ...] = ()  # host directories below it, top first (an overlay's lower layers)
    stubs: frozenset[str] = frozenset()  # a holder directory's own entries (mount points): not the test's

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "scratch": self.scratch, "lowers": list(self.lowers), "stubs": sorted(self.stubs)}


def mount_points(plan: MountPlan) -> frozenset[str]:
    """Every path inside the sandbox something is mounted on: the directory (or file) a writable
    layer has there is the plan's stub, hidden by the mount, never the test's."""
    found = set()
    for step in plan.steps:
        target = getattr(step, "target", None) or getattr(step, "path", None)
        if isinstance(target, str):
            inside = _inside(plan, target, getattr(step, "root", None))
            if inside is not None and inside != "/":
                found.add(inside.strip("/"))
    return frozenset(found)


def kept_sources(plan: MountPlan) -> list[KeptSource]:
    """The writable directories of *plan*'s sandbox, shallowest sandbox path first."""
    sources: list[KeptSource] = []
    for step in plan.steps:
        if isinstance(step, MountOverlay):
            path = _inside(plan, step.target, step.root)
            if path is None:
                continue
            lowers = []
            for lower in step.lowers:
                full = lower if posixpath.isabs(lower) else posixpath.join(step.cwd or "/", lower)
                if full == plan.scratch or full.startswith(plan.scratch + "/"):
                    continue  # the init layer: generated per sandbox, nothing of the image
                lowers.append(os.path.realpath(full))
            # scratch="disk", image "host": "/" is an overlay whose entries are the plan's stubs
            root_stubs = frozenset(os.listdir("/")) | REPLACED_TOP_LEVEL if step.name == "mount_root_dir" else frozenset()
            sources.append(KeptSource(path, _relative(plan, step.upper), tuple(lowers), root_stubs))
        elif isinstance(step, BindScratchDir) and step.name not in NOT_KEPT_NAMES:
            path = _inside(plan, step.target, step.root)
            if path is None:
                continue
            stubs: frozenset[str] = frozenset()
            if step.name == "mount_root_dir":
                stubs = frozenset(os.listdir("/")) | REPLACED_TOP_LEVEL
            elif step.name == "mount_host_path_dir":
                stubs = frozenset(os.listdir(path))
            sources.append(KeptSource(path, _relative(plan, step.source), (), stubs))
    return sorted(sources, key=lambda s: (s.path.count("/") if s.path != "/" else 0, s.path))


def _inside(plan: MountPlan, target: str, root: str | None) -> str | None:
    if root is not None:
        return "/" + posixpath.normpath(target).lstrip("/")
    if target == plan.root:
        return "/"
    if target.startswith(plan.root + "/"):
        return target[len(plan.root) :]
    return None


def init_files(plan: MountPlan) -> dict[str, str]:
    """The init layer's files (/etc/hostname, /etc/hosts, /etc/resolv.conf) by sandbox path: what
    the test saw below its writable layer there, rather than the image's."""
    init = f"{plan.scratch}/init/"
    found: dict[str, str] = {}
    for step in plan.steps:
        if isinstance(step, MakeTree) and step.name == "write_init_layer":
            found.update(("/" + path[len(init) :], text) for path, text in step.files if path.startswith(init))
    return found


def _relative(plan: MountPlan, path: str) -> str:
    return posixpath.relpath(path, plan.scratch)


# --- ids ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdMap:
    """A user namespace's uid_map or gid_map: (inside, outside, count) lines."""

    ranges: tuple[tuple[int, int, int], ...]

    @classmethod
    def read(cls, path: str) -> IdMap:
        try:
            with open(path) as handle:
                text = handle.read()
        except OSError:
            return cls(())
        ranges = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3:
                ranges.append((int(parts[0]), int(parts[1]), int(parts[2])))
        return cls(tuple(ranges))

    def inside(self, outside: int) -> int:
        for first_inside, first_outside, count in self.ranges:
            if first_outside <= outside < first_outside + count:
                return first_inside + outside - first_outside
        return NOBODY


# --- copying out -------------------------------------------------------------------------------


@dataclass
class Written:
    """What write_layer put in the tar: member count and bytes of file content."""

    members: int = 0
    content_bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # sandbox paths not kept: sockets, devices, unreadable files


def pid_of_pidfd(pidfd: int) -> int | None:
    """The pid (in the caller's PID namespace) of the process a pidfd refers to, from fdinfo."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as handle:
            for line in handle:
                if line.startswith("Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError):
        return None
    return None


def write_layer(
    scratch_root: str,
    sources: list[KeptSource],
    hidden: frozenset[str],
    out: tarfile.TarFile,
    uids: IdMap,
    gids: IdMap,
    limit: int | None,
) -> Written:
    """Write every source under *scratch_root* (a path reaching the scratch tmpfs, e.g.
    ``/proc/<pid>/fd/<n>``) into *out*, in OCI layer form; *hidden* (member names: mount
    points) are left out. Raises LayerTooLarge once the file content passes *limit* bytes."""
    written = Written()
    emitted: set[str] = set()
    for source in sources:
        top = os.path.join(scratch_root, source.scratch)
        try:
            top_stat = os.lstat(top)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(top_stat.st_mode):
            continue
        name = source.path.strip("/")
        if name and name not in emitted:
            _add_parents(out, name, emitted, written)
            _add(out, top, name, top_stat, uids, gids, written, limit)
            emitted.add(name)
        for entry_path, entry_name, entry_stat in _walk(top, name, source.stubs, hidden):
            if stat.S_ISCHR(entry_stat.st_mode) and entry_stat.st_rdev == 0:
                parent, base = posixpath.split(entry_name)
                _add_marker(out, posixpath.join(parent, WHITEOUT_PREFIX + base), written)
                continue
            if stat.S_ISSOCK(entry_stat.st_mode) or stat.S_ISCHR(entry_stat.st_mode) or stat.S_ISBLK(entry_stat.st_mode):
                written.skipped.append("/" + entry_name)
                continue
            try:
                _add(out, entry_path, entry_name, entry_stat, uids, gids, written, limit)
            except PermissionError:  # rootless: a file of an id pytest's user cannot read
                written.skipped.append("/" + entry_name)
                continue
            emitted.add(entry_name)
            if stat.S_ISDIR(entry_stat.st_mode) and is_opaque(entry_path) and _below(source, entry_name):
                _add_marker(out, posixpath.join(entry_name, OPAQUE_MARKER), written)
    return written


def _below(source: KeptSource, name: str) -> bool:
    """Whether a lower layer of *source* has *name* (overlayfs marks every new directory opaque:
    only one that hides something is a deletion worth its marker)."""
    relative = posixpath.relpath("/" + name, source.path)
    return any(os.path.lexists(os.path.join(lower, relative)) for lower in source.lowers)


def _walk(top: str, prefix: str, stubs: frozenset[str], hidden: frozenset[str]) -> Iterator[tuple[str, str, os.stat_result]]:
    """(host path, member name, lstat) of everything below *top*, parents first; never follows a
    symlink. At the top level, *stubs* (a holder's entries) are left out, anywhere *hidden* ones."""
    pending = [(top, prefix, True)]
    while pending:
        directory, name, first = pending.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name, reverse=True)
        except OSError:
            continue
        children = []
        for entry in reversed(entries):
            if first and entry.name in stubs:
                continue
            try:
                entry_stat = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            member = posixpath.join(name, entry.name) if name else entry.name
            if member in hidden:
                continue
            yield entry.path, member, entry_stat
            if stat.S_ISDIR(entry_stat.st_mode):
                children.append((entry.path, member, False))
        pending.extend(reversed(children))


def is_opaque(directory: str) -> bool:
    for attribute in OPAQUE_XATTRS:
        try:
            if os.getxattr(directory, attribute, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _add_parents(out: tarfile.TarFile, name: str, emitted: set[str], written: Written) -> None:
    parts = name.split("/")[:-1]
    for index in range(len(parts)):
        parent = "/".join(parts[: index + 1])
        if parent in emitted:
            continue
        info = tarfile.TarInfo(parent)
        info.type = tarfile.DIRTYPE
        host = "/" + parent
        try:  # the mode the host (or image) shows: a layer's directory entry replaces the one below
            st = os.lstat(host)
            info.mode, info.mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
        except OSError:
            info.mode = 0o755
        out.addfile(info)
        emitted.add(parent)
        written.members += 1


def _add_marker(out: tarfile.TarFile, name: str, written: Written) -> None:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    info.mtime = int(time.time())
    out.addfile(info)
    written.members += 1


def _add(
    out: tarfile.TarFile,
    path: str,
    name: str,
    st: os.stat_result,
    uids: IdMap,
    gids: IdMap,
    written: Written,
    limit: int | None,
) -> None:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = uids.inside(st.st_uid), gids.inside(st.st_gid)
    info.mtime = int(st.st_mtime)
    xattrs = _user_xattrs(path)
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{key}": value for key, value in xattrs.items()}
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        out.addfile(info)
    elif stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
        out.addfile(info)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
        out.addfile(info)
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            info.size = os.fstat(handle.fileno()).st_size
            written.content_bytes += info.size
            if limit is not None and written.content_bytes > limit:
                raise LayerTooLarge(f"more than {limit} bytes")
            out.addfile(info, handle)
    else:
        return
    written.members += 1


def _user_xattrs(path: str) -> dict[str, str]:
    """user.* extended attributes, overlayfs's own markers left out."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    found = {}
    for key in names:
        if key.startswith("user.") and not key.startswith("user.overlay."):
            try:
                found[key] = os.getxattr(path, key, follow_symlinks=False).decode("utf-8", "surrogateescape")
            except OSError:
                continue
    return found
