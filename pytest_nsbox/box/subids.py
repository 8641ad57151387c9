"""Subordinate ids for rootless builds: a full id map written from outside by newuidmap/newgidmap.

An unprivileged process may map only its own uid into a user namespace it creates, and only with
a one-line map that it writes itself. Builds that switch users or change owners (mmdebstrap, apt,
dpkg, useradd) need more ids: root inside mapped to the caller (so what root creates stays the
caller's on disk) and ids 1..65536 mapped to the caller's range in ``/etc/subuid`` and
``/etc/subgid``. Only the setuid helpers ``newuidmap``/``newgidmap`` (Debian package ``uidmap``)
may write such a map, from the parent namespace, for a process that has already unshared:

    X  the process that needs the map         H  the mapper (forked by X before unshare)
       start(): fork H                        ─  waits for X's "go"
       unshare(CLONE_NEWUSER)
       finish(): "go" ──────────────────────▶ newuidmap X 0 uid 1 1 subuid 65536
                 wait for H ◀──────────────── newgidmap X 0 gid 1 1 subgid 65536; exit
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..errors import NsboxError
from . import _linux as L
from .child import run_in_child

SUBUID_FILE: Final = Path("/etc/subuid")
SUBGID_FILE: Final = Path("/etc/subgid")
MAPPED_IDS: Final = 65536  # ids 1..65536 inside: every id a Debian system uses, nobody (65534) included
HELPERS: Final = ("newuidmap", "newgidmap")

NO_HELPERS: Final = "{names} not found in PATH (Debian package uidmap: apt install uidmap)"
HELPER_NOT_PRIVILEGED: Final = (
    "{path} is neither setuid root nor has file capabilities, so it cannot write id maps (reinstall package uidmap)"
)
NO_NEW_PRIVS: Final = "this process runs with no_new_privs set, which keeps the setuid newuidmap/newgidmap from working"
NO_FILE: Final = "{file} does not exist, so user {user!r} has no subordinate {kind} range"
NO_ENTRY: Final = "{file} has no subordinate {kind} range for user {user!r} (uid {uid})"
TOO_SMALL: Final = "{file} gives user {user!r} at most {count} subordinate {kind}s ({ranges}); {needed} are needed"
ADD_RANGES_HINT: Final = "as root: usermod --add-subuids {first}-{last} --add-subgids {first}-{last} {user}"
FIRST_SUBORDINATE_ID: Final = 100000  # where useradd starts giving out ranges (SUB_UID_MIN)
MISSING: Final = "subordinate ids cannot be mapped: {problems}"


class SubordinateIdError(NsboxError):
    """Subordinate ids cannot be mapped here; the message says exactly what is missing and the fix."""

    def __init__(self, problems: list[str], hint: str = "") -> None:
        self.problems = problems
        self.hint = hint
        super().__init__(MISSING.format(problems="; ".join(problems)), fix=hint)

    def __reduce__(self) -> tuple[type[SubordinateIdError], tuple[list[str], str]]:
        return type(self), (self.problems, self.hint)


@dataclass(frozen=True, slots=True)
class Range:
    start: int
    count: int


def parse_ranges(text: str, user: str | None, uid: int) -> list[Range]:
    """The ranges that subuid/subgid *text* (``owner:start:count`` lines) give a user, in file order.

    The owner is the login name or the numeric uid, as newuidmap accepts both. Blank lines,
    comments and malformed lines are ignored.
    """
    ranges = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) != 3:
            continue
        owner, start, count = fields
        if owner != user and owner != str(uid):
            continue
        try:
            parsed = Range(int(start), int(count))
        except ValueError:
            continue
        if parsed.start >= 0 and parsed.count > 0:
            ranges.append(parsed)
    return ranges


@dataclass(frozen=True, slots=True)
class IdMapping:
    """Root inside -> the caller's uid/gid; ids 1..MAPPED_IDS inside -> the subordinate ranges."""

    uid: int
    gid: int
    subuid: Range
    subgid: Range
    newuidmap: str
    newgidmap: str

    def commands(self, pid: int) -> list[list[str]]:
        """The newuidmap and newgidmap calls that map the user namespace of *pid*."""
        return [
            [self.newuidmap, str(pid), "0", str(self.uid), "1", "1", str(self.subuid.start), str(MAPPED_IDS)],
            [self.newgidmap, str(pid), "0", str(self.gid), "1", "1", str(self.subgid.start), str(MAPPED_IDS)],
        ]

    @property
    def direct(self) -> bool:
        """Root writes the maps itself (newuidmap would look for root's own subordinate ids)."""
        return not self.newuidmap

    def to_args(self) -> list[str]:
        """The mapping as command-line arguments (for the builder; see from_args)."""
        return [str(v) for v in (self.uid, self.gid, self.subuid.start, self.subgid.start, self.newuidmap, self.newgidmap)]

    @classmethod
    def from_args(cls, args: list[str]) -> IdMapping:
        uid, gid, subuid, subgid, newuidmap, newgidmap = args
        return cls(int(uid), int(gid), Range(int(subuid), MAPPED_IDS), Range(int(subgid), MAPPED_IDS), newuidmap, newgidmap)


def root_mapping() -> IdMapping:
    """Root's build sandboxes: ids 0..MAPPED_IDS inside are the same ids outside."""
    identity = Range(1, MAPPED_IDS)
    return IdMapping(0, 0, identity, identity, "", "")


# --- the ids of a test's sandbox ---------------------------------------------------------------

SANDBOX_FIRST_ID: Final = 2_130_000_001
"""As root, ids 1..MAPPED_IDS inside a test's sandbox are 2130000000 + id outside: a range no host user
or group owns (checked), above systemd's container range (524288..1879048191) and below its
foreign range (2147352576..), so a file a test gives to uid 1000 in basetemp is nobody's on the host."""
PASSWD_FILE: Final = Path("/etc/passwd")
GROUP_FILE: Final = Path("/etc/group")
RANGE_TAKEN: Final = "ids {first}-{last} (for a sandbox's ids 1-{count}) are not free: {taken}"
ONE_ID: Final = "one id mapped (root inside = you): {reason}"
NOT_MAPPED_HERE: Final = "ids {first}-{last} are not mapped in this process's own user namespace ({file})"
TRIAL_FAILED: Final = "mapping the subordinate ids failed: {error}"


@dataclass(frozen=True, slots=True)
class SandboxIds:
    """How a test's sandbox maps ids: *mapping* (root inside = the caller, ids 1..MAPPED_IDS to a
    range of their own), or None with *reason*: only the caller's own id."""

    mapping: IdMapping | None
    reason: str = ""

    @property
    def subordinate(self) -> bool:
        """Mapped through the caller's subordinate ids (rootless): ids the caller cannot change on disk."""
        return self.mapping is not None and not self.mapping.direct

    def describe(self) -> str:
        if self.mapping is None:
            return ONE_ID.format(reason=self.reason)
        sub = self.mapping.subuid
        return f"ids 0-{MAPPED_IDS} mapped (1-{MAPPED_IDS} to {sub.start}-{sub.start + sub.count - 1})"


def _taken_ids(text: str, column: int, first: int, last: int) -> list[str]:
    """Names of passwd/group entries (id in *column*) whose id lies in first..last."""
    taken = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) > column and fields[column].isdigit() and first <= int(fields[column]) <= last:
            taken.append(f"{fields[0]} ({fields[column]})")
    return taken


def _overlapping_ranges(text: str, first: int, last: int) -> list[str]:
    taken = []
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            start, count = int(fields[1]), int(fields[2])
            if start <= last and first < start + count:
                taken.append(f"{fields[0]}:{start}:{count}")
    return taken


def root_sandbox_mapping(
    *,
    first: int = SANDBOX_FIRST_ID,
    passwd_file: Path = PASSWD_FILE,
    group_file: Path = GROUP_FILE,
    subuid_file: Path = SUBUID_FILE,
    subgid_file: Path = SUBGID_FILE,
) -> IdMapping:
    """Root's test sandboxes: root inside is root, ids 1..MAPPED_IDS are first.. outside, once
    checked free (no user or group has such an id, no subordinate range overlaps it).

    Raises SubordinateIdError naming what takes the range.
    """
    last = first + MAPPED_IDS - 1
    taken: list[str] = []
    for file, column in ((passwd_file, 2), (group_file, 2)):
        try:
            taken += [f"{file}: {entry}" for entry in _taken_ids(file.read_text(), column, first, last)]
        except OSError:
            pass
    for file in (subuid_file, subgid_file):
        try:
            taken += [f"{file}: {entry}" for entry in _overlapping_ranges(file.read_text(), first, last)]
        except OSError:
            pass
    if taken:
        raise SubordinateIdError([RANGE_TAKEN.format(first=first, last=last, count=MAPPED_IDS, taken="; ".join(taken))])
    for name in ("uid_map", "gid_map"):  # root of a container's user namespace may have fewer ids
        try:
            covered = covers(Path(f"/proc/self/{name}").read_text(), first, last)
        except OSError:
            covered = True  # a kernel without user namespaces: no sandbox anyway
        if not covered:
            raise SubordinateIdError([NOT_MAPPED_HERE.format(first=first, last=last, file=f"/proc/self/{name}")])
    ids = Range(first, MAPPED_IDS)
    return IdMapping(os.getuid(), os.getgid(), ids, ids, "", "")


def covers(id_map: str, first: int, last: int) -> bool:
    """Whether one line of a uid_map/gid_map (inside, outside, count) maps all of first..last."""
    for line in id_map.splitlines():
        fields = line.split()
        if len(fields) == 3 and all(f.isdigit() for f in fields):
            start, count = int(fields[0]), int(fields[2])
            if start <= first and last < start + count:
                return True
    return False


_sandbox_ids: tuple[int, SandboxIds] | None = None  # (pid, what sandbox_ids found for it)


def sandbox_ids() -> SandboxIds:
    """The ids of this process's test sandboxes: as root a free high range (root_sandbox_mapping),
    rootless the user's subordinate ids (find_mapping); else only the caller's own id. Read once
    per process."""
    global _sandbox_ids
    if _sandbox_ids is None or _sandbox_ids[0] != os.getpid():
        try:
            found = SandboxIds(root_sandbox_mapping() if os.geteuid() == 0 else _tried(find_mapping()))
        except SubordinateIdError as exc:
            found = SandboxIds(None, "; ".join(exc.problems))
        _sandbox_ids = (os.getpid(), found)
    return _sandbox_ids[1]


def _tried(mapping: IdMapping) -> IdMapping:
    """*mapping*, once newuidmap/newgidmap have written it for a child: they refuse ranges the
    files give but the parent namespace lacks (a container that maps fewer ids)."""
    try:
        run_mapped(mapping, lambda: None)
    except RuntimeError as exc:
        raise SubordinateIdError([TRIAL_FAILED.format(error=exc)]) from None
    return mapping


def free_start(*files: Path) -> int:
    """The first id after every range the files give out (ranges must not overlap), at least 100000."""
    end = FIRST_SUBORDINATE_ID
    for file in files:
        try:
            text = file.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            fields = line.strip().split(":")
            if len(fields) == 3 and not fields[0].startswith("#") and fields[1].isdigit() and fields[2].isdigit():
                end = max(end, int(fields[1]) + int(fields[2]))
    return end


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _privileged(path: str) -> bool:
    st = os.stat(path)
    if st.st_mode & stat.S_ISUID and st.st_uid == 0:
        return True
    try:
        return bool(os.getxattr(path, "security.capability"))
    except OSError:
        return False


def _no_new_privs() -> bool:
    try:
        with open("/proc/self/status") as handle:
            return any(line.split() == ["NoNewPrivs:", "1"] for line in handle)
    except OSError:
        return False


def _pick(file: Path, kind: str, user: str | None, uid: int, problems: list[str]) -> Range | None:
    label = user if user is not None else str(uid)
    try:
        text = file.read_text()
    except FileNotFoundError:
        problems.append(NO_FILE.format(file=file, user=label, kind=kind))
        return None
    except OSError as exc:
        problems.append(f"cannot read {file}: {exc.strerror}")
        return None
    ranges = parse_ranges(text, user, uid)
    big = [r for r in ranges if r.count >= MAPPED_IDS]
    if big:
        return big[0]
    if not ranges:
        problems.append(NO_ENTRY.format(file=file, kind=kind, user=label, uid=uid))
    else:
        listed = ", ".join(f"{r.start}-{r.start + r.count - 1}" for r in ranges)
        count = max(r.count for r in ranges)
        problems.append(TOO_SMALL.format(file=file, user=label, count=count, kind=kind, ranges=listed, needed=MAPPED_IDS))
    return None


def find_mapping(
    *,
    uid: int | None = None,
    gid: int | None = None,
    subuid_file: Path = SUBUID_FILE,
    subgid_file: Path = SUBGID_FILE,
    which: Callable[[str], str | None] | None = None,
) -> IdMapping:
    """The caller's full id mapping, or SubordinateIdError naming everything that is missing.

    Reads the files and checks the helpers before blaming them: a missing helper, a helper that
    is not privileged, no_new_privs, no range for the user, and a range smaller than MAPPED_IDS
    are each reported, with the command that fixes it.
    """
    if which is None:
        import shutil

        which = shutil.which
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    user = _user_name(uid)
    problems: list[str] = []
    helpers = {name: which(name) for name in HELPERS}
    absent = [name for name, path in helpers.items() if path is None]
    if absent:
        problems.append(NO_HELPERS.format(names=" and ".join(absent)))
    for path in helpers.values():
        if path is not None and not _privileged(path):
            problems.append(HELPER_NOT_PRIVILEGED.format(path=path))
    if not absent and _no_new_privs():
        problems.append(NO_NEW_PRIVS)
    missing_ranges = len(problems)
    subuid = _pick(subuid_file, "uid", user, uid, problems)
    subgid = _pick(subgid_file, "gid", user, uid, problems)
    if problems or subuid is None or subgid is None:
        hint = ""
        if len(problems) > missing_ranges:
            first = free_start(subuid_file, subgid_file)
            hint = ADD_RANGES_HINT.format(first=first, last=first + MAPPED_IDS - 1, user=user if user is not None else uid)
        raise SubordinateIdError(problems, hint)
    newuidmap, newgidmap = helpers["newuidmap"], helpers["newgidmap"]
    assert newuidmap is not None and newgidmap is not None
    return IdMapping(uid, gid, subuid, subgid, newuidmap, newgidmap)


class Mapper:
    """Maps the caller's new user namespace from outside: start() before unshare, finish() after."""

    def __init__(self, mapping: IdMapping) -> None:
        self.mapping = mapping
        self._pid = 0
        self._go = -1
        self._report = -1

    def start(self) -> None:
        """Fork the mapper H while this process is still in the parent user namespace."""
        target = os.getpid()
        go_read, self._go = os.pipe()
        self._report, report_write = os.pipe()
        self._pid = os.fork()
        if self._pid == 0:  # H
            code = 1
            try:
                os.close(self._go)
                os.close(self._report)
                if os.read(go_read, 1) == b"1":  # EOF: the caller died before it unshared
                    problem = _write_maps(self.mapping, target)
                    os.write(report_write, problem.encode())
                    code = 0 if not problem else 1
            finally:
                os._exit(code)
        os.close(go_read)
        os.close(report_write)

    def finish(self) -> None:
        """After unshare(CLONE_NEWUSER): let H write the maps, wait for it, raise what failed."""
        os.write(self._go, b"1")
        os.close(self._go)
        chunks = []
        while chunk := os.read(self._report, 4096):
            chunks.append(chunk)
        os.close(self._report)
        _, status = os.waitpid(self._pid, 0)
        message = b"".join(chunks).decode(errors="replace")
        if os.waitstatus_to_exitcode(status) != 0 or message:
            raise SubordinateIdError([message or f"the id mapper exited with status {os.waitstatus_to_exitcode(status)}"])


PARENT_WAIT: Final = 30.0  # seconds P waits for its child to unshare (a few steps, never blocking)
IDS_MAPPED: Final = b"ok"


class ParentMapper:
    """Maps a child's new user namespace from its parent, with no process of its own (the forked
    form: P maps A, saving the fork of a mapper per sandbox). Made before the fork; then the
    parent calls map_child(pid), the child in_child(), keeps child_fds() and calls finish()
    after unshare."""

    def __init__(self, mapping: IdMapping) -> None:
        self.mapping = mapping
        self._ready_read, self._ready_write = os.pipe()
        self._done_read, self._done_write = os.pipe()

    def child_fds(self) -> set[int]:
        return {self._ready_write, self._done_read}

    def map_child(self, pid: int) -> None:
        """In the parent, right after the fork: once the child has unshared, write its maps."""
        os.close(self._ready_write)
        os.close(self._done_read)
        try:
            import select  # imported by pytest already; the builder never gets here

            if select.select([self._ready_read], [], [], PARENT_WAIT)[0] and os.read(self._ready_read, 1) == b"1":
                problem = _write_maps(self.mapping, pid)
                os.write(self._done_write, problem.encode() if problem else IDS_MAPPED)
        finally:  # EOF for the child: it fails at map_subordinate_ids if nothing was written
            os.close(self._ready_read)
            os.close(self._done_write)

    def close(self) -> None:
        """The fork failed: close every end."""
        for fd in (self._ready_read, self._ready_write, self._done_read, self._done_write):
            os.close(fd)

    def in_child(self) -> None:
        """In the child, right after the fork: close the parent's ends."""
        os.close(self._ready_read)
        os.close(self._done_write)

    def finish(self) -> None:
        """In the child, after unshare(CLONE_NEWUSER): have the parent map it; raise what failed."""
        os.write(self._ready_write, b"1")
        os.close(self._ready_write)
        chunks = []
        while chunk := os.read(self._done_read, 4096):
            chunks.append(chunk)
        os.close(self._done_read)
        answer = b"".join(chunks)
        if answer != IDS_MAPPED:
            raise SubordinateIdError([answer.decode(errors="replace") or "the parent process did not map the user namespace"])


def _write_maps(mapping: IdMapping, pid: int) -> str:
    if mapping.direct:
        for name, own, sub in (("uid_map", mapping.uid, mapping.subuid), ("gid_map", mapping.gid, mapping.subgid)):
            try:
                with open(f"/proc/{pid}/{name}", "w") as handle:
                    handle.write(f"0 {own} 1\n1 {sub.start} {sub.count}\n")
            except OSError as exc:
                return f"writing /proc/{pid}/{name} failed: {exc}"
        return ""
    for command in mapping.commands(pid):
        import subprocess  # lazy: the builder never runs it (a smaller heap to fork)

        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return f"{' '.join(command)} failed ({proc.returncode}): {proc.stderr.strip()}"
    return ""


def run_mapped(mapping: IdMapping, body: Callable[[], None]) -> None:
    """Run *body* in a forked child that is root of a new user namespace with *mapping*.

    Raises RuntimeError with the child's error if the mapping or *body* fails.
    """

    def mapped() -> None:
        mapper = Mapper(mapping)
        mapper.start()
        L.unshare(L.CLONE_NEWUSER)
        mapper.finish()  # this process is now root inside, with every capability there
        body()

    problem = run_in_child(mapped)
    if problem:
        raise RuntimeError(problem)


def chown_tree_to_root(top: Path) -> None:
    """Give every entry under *top* (and *top*) to root of the current user namespace.

    Run it with run_mapped: root inside is the caller on disk, so the tree becomes the caller's.
    Modes are kept (chown clears setuid/setgid bits), and so are file capabilities (chown drops
    ``security.capability``); symlinks are changed, never followed.
    """
    _chown_to_root(str(top))
    for root, dirs, files in os.walk(top, onerror=_raise):
        for name in (*dirs, *files):
            _chown_to_root(os.path.join(root, name))


def _raise(exc: OSError) -> None:
    raise exc


def _chown_to_root(path: str) -> None:
    st = os.lstat(path)
    if st.st_uid == 0 and st.st_gid == 0:
        return
    if stat.S_ISLNK(st.st_mode):
        os.chown(path, 0, 0, follow_symlinks=False)
        return
    capability = None
    if stat.S_ISREG(st.st_mode):
        try:
            capability = os.getxattr(path, "security.capability", follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    os.chown(path, 0, 0, follow_symlinks=False)
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        os.chmod(path, stat.S_IMODE(st.st_mode))  # not a symlink
    if capability is not None:
        os.setxattr(path, "security.capability", capability, follow_symlinks=False)
