"""A sandbox's scratch on the host's disk (``scratch="disk"``): directories, usage, removal.

With ``scratch="memory"`` every place a sandbox writes is a directory of one tmpfs (mounts.py).
With ``scratch="disk"`` the same directories are in a directory on the host's disk that P makes
for the sandbox and the plan binds in place of the tmpfs (``mount_scratch_dir``). There is no
ENOSPC at the bound on a plain directory: P measures what it holds while the test runs
(``DiskWatch``) and kills the sandbox once it is over the bound.

Layout, in ``$TMPDIR`` (if set) or ``/var/tmp``::

    pytest-nsbox-disk-<uid>/          mode 0700, the user's
      run-<pid>-XXXX/                 one per pytest process (xdist worker); P holds a flock on it
        XXXX/                         one per sandbox, mode 0700, removed when its processes are gone

A run directory whose lock nobody holds belongs to a process that was killed: it is removed at
the next start (``sweep``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import stat
import time
from collections.abc import Callable
from typing import Final

from . import subids

USER_DIR_PREFIX: Final = "pytest-nsbox-disk-"  # + uid (not a mounts.SCRATCH_PREFIX name: no pid follows)
RUN_PREFIX: Final = "run-"
DEFAULT_BASE: Final = "/var/tmp"  # on disk where /tmp is a tmpfs (FHS: for larger temporary files)
MEMORY_FILESYSTEMS: Final = ("tmpfs", "ramfs")
NO_UPPER_FILESYSTEMS: Final = ("overlay",)  # overlayfs cannot put an upper layer there
POLL_INTERVAL: Final = 0.1  # seconds between two looks at a running sandbox's usage, at least
POLL_SHARE: Final = 10  # ... and at least this many times the time one look took (a tenth of P's time)


class DiskScratchError(OSError):
    """The disk scratch cannot be made here; the message says where and why."""


def base_dir() -> str:
    """Where the users' directories go: $TMPDIR if set, else /var/tmp."""
    return os.environ.get("TMPDIR") or DEFAULT_BASE


def filesystem_type(path: str) -> str | None:
    """The type of the filesystem holding *path* (from /proc/self/mountinfo), or None."""
    try:
        real = os.path.realpath(path)
        with open("/proc/self/mountinfo") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    best, best_type = "", None
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        fstype = line.split(" - ", 1)[1].split()[0]
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fstype
    return best_type


def free_space(path: str) -> int:
    """Bytes an ordinary user may still write on the filesystem of *path*."""
    usage = os.statvfs(path)
    return usage.f_bavail * usage.f_frsize


def user_dir(base: str | None = None) -> str:
    """The caller's directory in *base* (made if missing), checked: a directory, the caller's, 0700."""
    base = base or base_dir()
    path = os.path.join(base, f"{USER_DIR_PREFIX}{os.getuid()}")
    fstype = filesystem_type(base)
    if fstype in MEMORY_FILESYSTEMS:
        raise DiskScratchError(
            errno.EINVAL,
            f"{base} is a {fstype} (memory), not a disk: scratch='disk' would still write to memory. "
            f"Hint: set TMPDIR to a directory on a disk (outside the project), e.g. TMPDIR={DEFAULT_BASE}",
        )
    if fstype in NO_UPPER_FILESYSTEMS:
        raise DiskScratchError(
            errno.EINVAL,
            f"{base} is on {fstype}, which cannot hold a sandbox's writable layers (an overlay's upper layer). "
            f"Hint: set TMPDIR to a directory on a disk filesystem such as ext4, xfs or btrfs (outside the project)",
        )
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise DiskScratchError(exc.errno, f"cannot make {path}: {exc.strerror}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise DiskScratchError(
            errno.EPERM,
            f"{path} is not a directory of yours with mode 0700 (owner {st.st_uid}, mode {stat.filemode(st.st_mode)}): "
            "refusing to put sandboxes there. Hint: remove it, or set TMPDIR to another directory",
        )
    return path


class RunDir:
    """The directory of this pytest process's disk scratches, locked while the process lives."""

    def __init__(self, base: str | None = None) -> None:
        import tempfile

        parent = user_dir(base)
        sweep(parent)
        self.path = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=parent)
        self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def new(self) -> str:
        """An empty directory (mode 0700) for one sandbox's scratch."""
        import tempfile

        return tempfile.mkdtemp(dir=self.path)

    def close(self) -> None:
        """Remove the run's directory (what is left in it too) and release the lock."""
        if self._fd is None:
            return
        remove_tree(self.path)
        os.close(self._fd)
        self._fd = None


def sweep_stale(base: str | None = None) -> None:
    """At a run's start: remove what killed runs left in the caller's directory, if it has one."""
    parent = os.path.join(base or base_dir(), f"{USER_DIR_PREFIX}{os.getuid()}")
    try:
        st = os.lstat(parent)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        sweep(parent)


def sweep(parent: str) -> None:
    """Remove the run directories of processes that were killed (nobody holds their lock)."""
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(RUN_PREFIX) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its process lives
        try:
            remove_tree(entry.path)
        except OSError:
            pass
        finally:
            os.close(fd)


def remove_tree(path: str) -> None:
    """Remove *path* and everything in it, as the sandbox left it: directories without
    permissions (overlayfs's ``work/work`` is mode 000, a test may chmod its own) are opened up
    first. Entries owned by ids the caller cannot change (a sandbox that maps subordinate ids)
    are removed by a process mapped with the caller's subordinate ids (subids.run_mapped), rootless."""
    try:
        _remove(path)
    except FileNotFoundError:
        return
    except PermissionError:
        if os.getuid() == 0:
            raise
        subids.run_mapped(subids.sandbox_ids().mapping or subids.find_mapping(), lambda: _remove(path))


def _remove(path: str) -> None:
    _open_up(path)
    for directory, subdirectories, _ in os.walk(path):
        for name in subdirectories:
            _open_up(os.path.join(directory, name))
    shutil.rmtree(path)


def _open_up(directory: str) -> None:
    """Give the owner read, write and search permission on *directory* (never through a symlink)."""
    st = os.lstat(directory)
    if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o700 != 0o700:
        os.chmod(directory, stat.S_IMODE(st.st_mode) | 0o700)


def usage(path: str) -> int:
    """Bytes the tree at *path* takes on disk (allocated blocks; a hard link counted once)."""
    total = 0
    seen: set[int] = set()
    stack = [path]
    while stack:
        directory = stack.pop()
        try:
            entries = os.scandir(directory)
        except OSError:
            continue  # removed meanwhile, or no permission (counted when it is listable again)
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_nlink > 1:
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return total


class ScratchHelper:
    """What P does with disk scratches, done by a helper process: ``usage()`` reads every
    directory a sandbox made, whatever its mode; ``remove()`` deletes a scratch while P goes on.

    The helper is a child of P, forked on first use. Rootless it is root of a user namespace of
    its own, with the sandboxes' ids (*mapping*: P's uid and its subordinate ids, or P's uid
    alone): a directory the test made mode 000, or gave to another id (root inside may still
    write into it), would hide what it holds from P, but not from the helper's
    CAP_DAC_READ_SEARCH over the ids it maps. It ends when P closes its socket (after the removals asked for) or dies.
    Without it (it could not start), P does both itself. P uses one helper to measure (rootless
    only: root reads everything) and another to remove, so that a look never waits for removals.
    """

    def __init__(self, mapping: Callable[[], subids.IdMapping | None], *, in_process: bool = False) -> None:
        self._mapping = mapping
        self._sock: socket.socket | None = None
        self._pid: int | None = None
        self._failed = in_process

    def usage(self, path: str) -> int:
        answer = self._ask(b"u", path, reply=True)
        return usage(path) if answer is None else int(answer)

    def remove(self, path: str) -> None:
        """Remove the scratch at *path* (every process of its sandbox is gone), now or soon."""
        if self._ask(b"r", path, reply=False) is None:
            remove_tree(path)

    def _ask(self, kind: bytes, path: str, *, reply: bool) -> bytes | None:
        if self._failed:
            return None
        try:
            sock = self._sock or self._start()
            sock.send(kind + os.fsencode(path))
            return sock.recv(64) if reply else b""
        except OSError:
            self._failed = True  # the helper is gone: P does it (sandboxes need user namespaces too)
            self.close()
            return None

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent, uid, gid = os.getpid(), os.getuid(), os.getgid()
        mapping = self._mapping() if uid != 0 else None
        pid = os.fork()
        if pid == 0:
            try:
                _serve(theirs, parent, uid, gid, mapping)
            finally:
                os._exit(1)
        theirs.close()
        self._sock, self._pid = ours, pid
        return ours

    def close(self) -> None:
        """Let the helper finish the removals asked for, and wait for it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._pid, 0)  # it exits at EOF
            self._pid = None


def _serve(sock: socket.socket, parent: int, uid: int, gid: int, mapping: subids.IdMapping | None) -> None:
    """The helper: rootless, root of a user namespace of its own (with *mapping*); answers "u" +
    path with the usage of the tree there, and removes the tree on "r" + path (no answer)."""
    import gc
    import signal

    from . import _linux as L
    from .steps import close_all_but, write_id_maps

    gc.disable()  # a collection would copy pytest's heap, page by page
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is P's
    L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return
    close_all_but({sock.fileno()})
    if uid != 0 and mapping is not None:  # root reads and removes anything as it is; in a user namespace it would not
        mapper = subids.Mapper(mapping)
        mapper.start()
        L.unshare(L.CLONE_NEWUSER)
        mapper.finish()
    elif uid != 0:
        L.unshare(L.CLONE_NEWUSER)
        write_id_maps(uid, gid)
    while True:
        message = sock.recv(4096)
        if not message:
            return
        kind, path = message[:1], os.fsdecode(message[1:])
        if kind == b"u":
            sock.send(str(usage(path)).encode())
        else:
            with contextlib.suppress(OSError, RuntimeError):  # left for P's end of run, or the next run's sweep
                _remove(path)


class DiskWatch:
    """P's look at a disk scratch while its test runs: ``due()`` says when to look next,
    ``exceeded()`` whether the tree is over the bound (the bytes it holds, or None)."""

    def __init__(self, path: str, bound: int, measure: Callable[[str], int] = usage) -> None:
        self.path = path
        self.bound = bound
        self.measure = measure
        self.interval = POLL_INTERVAL
        self.next = time.monotonic() + self.interval

    def due(self) -> float:
        """Seconds until the next look (0: now)."""
        return max(self.next - time.monotonic(), 0.0)

    def exceeded(self) -> int | None:
        started = time.monotonic()
        used = self.measure(self.path)
        took = time.monotonic() - started
        self.interval = max(POLL_INTERVAL, POLL_SHARE * took)
        self.next = time.monotonic() + self.interval
        return used if used > self.bound else None
