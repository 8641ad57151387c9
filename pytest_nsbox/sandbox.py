"""The process model, in two forms.

Built when the test starts (``run(config, target)``; recipes' run steps, ``nsbox shell``,
``nsbox_prebuild = false``, kernels before 5.8):

    P  pytest            forks A, reads the result pipe, waits for A; kills A on interrupt
    A  unsharer          closes inherited descriptors, unshare(USER|NS|PID|NET|UTS|IPC|CGROUP),
                         writes its id maps, forks B, exits with B's status
    B  PID 1             runs the mount plan, pivot_root, hostname, loopback; forks C; gives up
                         its capabilities; reaps every orphan until C exits; sends C's status
    C  the test          drops capabilities, verifies it is inside, runs the target

Built ahead of time (``run(config, target, prebuilt=...)``, see prebuild.py): B' is PID 1 of a
sandbox the builder made while the previous test ran. As root, P forks C straight into B's PID
namespace and C joins the other namespaces through B's pidfd; rootless, P forks a joiner that
enters all of them and forks C. P sees C exit through a pidfd and kills B' when C is done.

A child never raises across the fork: a failure is a ``setup_error`` record plus ``os._exit``.
When PID 1 dies, the PID namespace takes every leftover process with it; the mount namespace
takes the scratch tmpfs (the writable layer) with it.
"""

from __future__ import annotations

import errno
import faulthandler
import gc
import os
import select
import signal
import socket
import stat
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Final

from . import _linux as L
from . import cgroups, subids, wire
from .mounts import ROOT_SOURCE, BindProc, MountFs, MountPlan, Step

MAX_FD: Final = 1 << 20  # fs.nr_open's default; close_range(2) takes any upper bound
EXIT_SETUP_FAILED: Final = 125
EXIT_INTERNAL_ERROR: Final = 126
NAMESPACES: Final = ("mnt", "pid", "net", "user", "uts", "ipc", "cgroup")

# Docker's default capability set. CAP_SYS_ADMIN is not in it: without it the test cannot
# re-mount the read-only binds (rootdir, interpreter) read-write or undo any other mount.
KEPT_CAPABILITIES: Final = frozenset(
    {0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31}
)  # CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP


def namespace_ids() -> dict[str, int]:
    """Inode numbers of the caller's namespaces (equal inode = same namespace)."""
    return {ns: os.stat(f"/proc/self/ns/{ns}").st_ino for ns in NAMESPACES}


def read_cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return L.CAP_LAST_CAP


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """Everything A, B and C need, computed in P before the fork."""

    plan: MountPlan
    network: str
    uid: int
    gid: int
    host_namespaces: dict[str, int]
    cwd: str
    cap_last_cap: int
    cgroup_files: tuple[bytes, ...] = ()  # A writes "0" to each: joins the sandbox's cgroup
    stack_fd: int | None = None  # C's faulthandler dumps its stack here on SIGUSR1 (timeouts)
    oom_first: bool = False  # C and its children are the OOM killer's first choice, not B
    id_mapping: subids.IdMapping | None = None  # rootless builds: map subordinate ids too (see unshare_steps)

    @property
    def clone_flags(self) -> int:
        flags = L.CLONE_NEWUSER | L.CLONE_NEWNS | L.CLONE_NEWPID | L.CLONE_NEWUTS | L.CLONE_NEWIPC | L.CLONE_NEWCGROUP
        if self.network == "none":
            flags |= L.CLONE_NEWNET
        return flags


@dataclass
class SandboxResult:
    """What P learned: the records in order, C's wait status (from B), A's wait status."""

    records: list[dict[str, Any]] = field(default_factory=list)
    test_status: int | None = None
    sandbox_status: int = 0
    wire_error: str | None = None
    timed_out: bool = False
    stack: str = ""  # the test's Python stack at the timeout, if it could be dumped
    usage: cgroups.Usage = field(default_factory=cgroups.Usage)  # read before the cgroup is removed
    done: bool = False  # C sent its last record: the test ran to its end

    @property
    def setup_error(self) -> dict[str, Any] | None:
        return next((r for r in self.records if r["kind"] == "setup_error"), None)


class Channel:
    """The write end of the result pipe, usable only by the process that owns it (C).

    A process the test forks inherits the object; its records are dropped so a forked child
    that returns into pytest's code cannot report twice.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.owner = os.getpid()

    def send(self, kind: str, **fields: Any) -> None:
        if os.getpid() == self.owner:
            wire.send(self.fd, {"kind": kind, **fields})


class SetupError(Exception):
    """A step of building the sandbox failed."""

    def __init__(self, step: str, exc: BaseException) -> None:
        self.step = step
        self.errno = getattr(exc, "errno", None)
        super().__init__(f"{step}: {exc}")


def _fail(channel: Channel, process: str, step: str, exc: BaseException, code: int = EXIT_SETUP_FAILED) -> None:
    try:
        channel.send(
            "setup_error",
            process=process,
            step=step,
            errno=getattr(exc, "errno", None),
            message=str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}",
            traceback="" if isinstance(exc, OSError) else traceback.format_exc(),
        )
    finally:
        os._exit(code)


def _run_steps(channel: Channel, process: str, steps: Iterable[tuple[str, Callable[[], None]]]) -> None:
    """Run named steps in order; the first failure is sent as a setup_error and ends the process."""
    for name, action in steps:
        try:
            action()
        except BaseException as exc:
            _fail(channel, process, name, exc)


def kept_descriptors(keep: Iterable[int]) -> set[int]:
    """The descriptors a sandbox keeps; every other one could reach outside.

    Kept: *keep*, regular files and character devices (pytest's capture files, /dev/null, a
    tty), and duplicates of stdin/stdout/stderr (pytest's capture saves them). Directories,
    sockets, pipes, anonymous inodes and namespace files (regular files of nsfs) are not:
    xdist's channel is a pair of pipes.
    """
    kept = set(keep)
    nsfs = os.stat("/proc/self/ns/net").st_dev
    std_files = set()
    for fd in (0, 1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        std_files.add((st.st_dev, st.st_ino))
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if st.st_dev == nsfs:
            continue
        if stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode) or (st.st_dev, st.st_ino) in std_files:
            kept.add(fd)
    return kept


def close_all_but(kept: Iterable[int]) -> None:
    """Close every descriptor not in *kept*, also one opened after *kept* was computed."""
    low = 0
    for fd in sorted(set(kept)):
        if fd > low:  # closerange(n, n) would be close_range(n, -1): everything from n on
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, MAX_FD)


def close_inherited_fds(keep: Iterable[int]) -> None:
    """Close descriptors that could reach outside (see kept_descriptors)."""
    close_all_but(kept_descriptors(keep))


def write_id_maps(uid: int, gid: int) -> None:
    """Map root inside to the invoking uid/gid (the only mapping an unprivileged process may write)."""
    try:
        with open("/proc/self/setgroups", "w") as handle:
            handle.write("deny")
    except FileNotFoundError:
        pass
    with open("/proc/self/uid_map", "w") as handle:
        handle.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as handle:
        handle.write(f"0 {gid} 1")


def unshare_steps(config: SandboxConfig) -> list[tuple[str, Callable[[], None]]]:
    """A's steps that create the namespaces and map ids into the user namespace.

    By default A maps only the invoking uid/gid, itself. With ``config.id_mapping`` (rootless
    image builds) a full map is written from outside by newuidmap/newgidmap: a mapper forked
    before unshare runs them for A's pid once A has unshared (see subids.Mapper).
    """
    unshare = ("unshare_namespaces", lambda: L.unshare(config.clone_flags))
    if config.id_mapping is None:
        return [unshare, ("write_id_maps", lambda: write_id_maps(config.uid, config.gid))]
    mapper = subids.Mapper(config.id_mapping)
    return [("start_id_mapper", mapper.start), unshare, ("map_subordinate_ids", mapper.finish)]


def drop_capabilities(cap_last_cap: int) -> None:
    """Docker's default set only, no ambient capabilities, and no_new_privs (bubblewrap)."""
    for cap in range(cap_last_cap + 1):
        if cap not in KEPT_CAPABILITIES:
            L.prctl(L.PR_CAPBSET_DROP, cap)
    L.prctl(L.PR_CAP_AMBIENT, L.PR_CAP_AMBIENT_CLEAR_ALL)
    kept = sum(1 << cap for cap in KEPT_CAPABILITIES if cap <= cap_last_cap)
    L.capset(kept, kept, 0)
    L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)


def harden_init(cap_last_cap: int) -> None:
    """PID 1 after the root is built: no capabilities, and none to regain (bounding set, no_new_privs).

    The test runs as the same user in the same user namespace and may ptrace PID 1 (it must stay
    dumpable: joining a prebuilt sandbox through its pidfd is a ptrace access check); with its
    capabilities, PID 1 would lend the test CAP_SYS_ADMIN, e.g. to remount a read-only bind of
    the checkout read-write. Reaping orphans needs no privilege.
    """
    for cap in range(cap_last_cap + 1):
        L.prctl(L.PR_CAPBSET_DROP, cap)
    L.prctl(L.PR_CAP_AMBIENT, L.PR_CAP_AMBIENT_CLEAR_ALL)
    L.capset(0, 0, 0)
    L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)


def root_mount_source(mountinfo: str) -> str | None:
    """The source of the mount at "/" (the last one stacked there)."""
    source = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/" and " - " in line:
            source = line.split(" - ", 1)[1].split()[1]
    return source


def sandbox_problems(host: dict[str, int], inside: dict[str, int], network: str, root_source: str | None) -> list[str]:
    """Why the current process is NOT a sandbox built by us (empty list: it is)."""
    required = ["mnt", "pid", "user", "uts", "ipc"] + (["net"] if network == "none" else [])
    problems = [f"{ns} namespace is the host's" for ns in required if inside.get(ns) == host.get(ns)]
    if root_source != ROOT_SOURCE:
        problems.append(f"root filesystem is {root_source!r}, not the sandbox's overlay ({ROOT_SOURCE!r})")
    return problems


def verify_inside(config: SandboxConfig) -> None:
    """Fail closed: refuse to run the test unless this process is really inside the sandbox."""
    with open("/proc/self/mountinfo") as handle:
        source = root_mount_source(handle.read())
    problems = sandbox_problems(config.host_namespaces, namespace_ids(), config.network, source)
    if problems:
        raise RuntimeError("not inside a sandbox: " + "; ".join(problems))


def _process_c(config: SandboxConfig, channel: Channel, target: Callable[[Channel], None]) -> None:
    channel = Channel(channel.fd)
    gc.enable()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    steps: list[tuple[str, Callable[[], None]]] = [
        ("drop_capabilities", lambda: drop_capabilities(config.cap_last_cap)),
        ("verify_sandbox", lambda: verify_inside(config)),
    ]
    if config.oom_first:
        steps.append(("prefer_test_for_oom", _prefer_for_oom))
    if config.stack_fd is not None:
        stack_fd = config.stack_fd
        steps.append(("register_stack_dump", lambda: faulthandler.register(signal.SIGUSR1, stack_fd, all_threads=True)))
    _run_steps(channel, "C", steps)
    try:
        os.chdir(config.cwd)
    except OSError:
        os.chdir("/")
    code = 0
    try:
        target(channel)
    except BaseException:
        channel.send("internal_error", process="C", traceback=traceback.format_exc())
        code = EXIT_INTERNAL_ERROR
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if code == 0 and os.getpid() == channel.owner:
            _kill_leftovers()  # everything the test started, before P hears that it is done
            channel.send("done")
        os._exit(code)


def _kill_leftovers() -> None:
    """SIGKILL every process of the PID namespace but the caller and PID 1 (kill(2) with -1)."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing left


def _prefer_for_oom() -> None:
    with open("/proc/self/oom_score_adj", "w") as handle:
        handle.write("1000")


def _parent_is(pid: int) -> bool:
    # getppid() is 0 in a new PID namespace; the host's /proc is still mounted at this point.
    with open("/proc/self/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1]) == pid


def _process_b(config: SandboxConfig, channel: Channel, a_pid: int, target: Callable[[Channel], None]) -> None:
    channel = Channel(channel.fd)
    _guard_parent(channel, "B", a_pid, in_new_pid_namespace=True)
    _run_steps(channel, "B", [(step.name, step.run) for step in config.plan.steps])
    c_pid = os.fork()
    if c_pid == 0:
        _process_c(config, channel, target)
    try:
        harden_init(config.cap_last_cap)
    except OSError as exc:
        os.kill(c_pid, signal.SIGKILL)
        _fail(channel, "B", "harden_init", exc)
    # PID 1: reap every orphan until C is gone; then kill and reap what C left running, so that
    # nothing of the test runs any more when P reads EOF. B's exit then tears the namespaces
    # down while P already goes on (P reaps A later).
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(EXIT_INTERNAL_ERROR)
        if pid == c_pid:
            break
    _kill_leftovers()  # from PID 1: every other process of this PID namespace
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
    try:
        channel.send("test_status", status=status)
        os.close(channel.fd)  # EOF for P now, not after this process's memory is torn down
    except OSError:
        pass  # P stopped reading at C's "done"
    os._exit(0)


def _unshare_steps(config: SandboxConfig, keep: set[int]) -> list[tuple[str, Callable[[], None]]]:
    """A's steps: nothing inherited that reaches outside, into the cgroup, new namespaces, id maps."""
    return [
        ("close_inherited_fds", lambda: close_inherited_fds(keep)),
        ("enter_cgroup", lambda: cgroups.join(config.cgroup_files)),
        *unshare_steps(config),
    ]


def _guard_parent(channel: Channel, process: str, parent: int, *, in_new_pid_namespace: bool) -> None:
    """Die with the parent (PR_SET_PDEATHSIG), and exit if it is already gone."""
    try:
        L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
        alive = _parent_is(parent) if in_new_pid_namespace else os.getppid() == parent
        if not alive:
            os._exit(EXIT_SETUP_FAILED)
    except BaseException as exc:
        _fail(channel, process, "set_parent_death_signal", exc)



def _ignore_signals_of_p() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # P handles ^C and kills the sandbox
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # only the test process dumps its stack on a timeout


def _process_a(config: SandboxConfig, channel: Channel, p_pid: int, target: Callable[[Channel], None]) -> None:
    _guard_parent(channel, "A", p_pid, in_new_pid_namespace=False)
    _ignore_signals_of_p()
    keep = {0, 1, 2, channel.fd} | ({config.stack_fd} if config.stack_fd is not None else set())
    _run_steps(channel, "A", _unshare_steps(config, keep))
    a_pid = os.getpid()
    b_pid = os.fork()
    if b_pid == 0:
        _process_b(config, channel, a_pid, target)
    os.close(channel.fd)
    _, status = os.waitpid(b_pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _run_child(config: SandboxConfig, write_fd: int, p_pid: int, target: Callable[[Channel], None]) -> None:
    """Body of A; never returns into the caller's (pytest's) code."""
    gc.disable()  # A and B allocate little; C turns it back on for the test
    try:
        _process_a(config, Channel(write_fd), p_pid, target)
    finally:
        os._exit(EXIT_INTERNAL_ERROR)


# --- sandboxes built ahead of time (see prebuild.py) ---------------------------------------


class Prebuilt:
    """A sandbox whose PID 1 (B') waits for a test to join it; P holds a pidfd of B'."""

    def __init__(self, pidfd: int) -> None:
        self.pidfd = pidfd

    def kill(self) -> None:
        """SIGKILL B': the PID namespace dies with it and takes every process inside along."""
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone

    def exited(self, timeout: float = 0) -> bool:
        """Whether B' has exited: its PID namespace is empty by then (a pidfd polls readable)."""
        return bool(select.select([self.pidfd], [], [], timeout)[0])

    def close(self) -> None:
        os.close(self.pidfd)


def enter_builder_namespaces(uid: int, gid: int) -> None:
    """In the builder: a user namespace (root inside = *uid*) and a PID namespace for its children.

    The builder then forks its worker, PID 1 of that PID namespace, which owns (through the
    user namespace) every PID namespace it creates for a sandbox and may switch back to its own.
    """
    L.unshare(L.CLONE_NEWUSER | L.CLONE_NEWPID)
    write_id_maps(uid, gid)


class PidNamespaceFactory:
    """The builder's worker: fork a process that is PID 1 of a new PID namespace, then switch back."""

    def __init__(self) -> None:
        self._own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

    def fork(self) -> int:
        L.unshare(L.CLONE_NEWPID)  # only the next child goes there: it is its PID 1
        try:
            pid = os.fork()
        except BaseException:
            L.setns(self._own, L.CLONE_NEWPID)
            raise
        if pid:
            L.setns(self._own, L.CLONE_NEWPID)
        return pid


def build_ahead(config: SandboxConfig, fd: int) -> None:
    """Body of B' (forked by the builder's worker, PID 1 of a new PID namespace). Never returns.

    Builds the sandbox, sends "ready" with a pidfd of itself over *fd* (a SOCK_SEQPACKET socket
    to the worker; setup errors go there as records), then reaps orphans until it is killed.

    B' starts in the builder's user namespace, which owns its PID namespace: there it mounts a
    /proc for that PID namespace (only a process with CAP_SYS_ADMIN over the PID namespace's
    owner may). Then it unshares a user namespace of the sandbox's own with every other
    namespace, and the mount plan binds that /proc instead of mounting one.
    """
    gc.disable()  # a collection would touch (and copy) every page of the builder's heap
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # the reaping loop sigwaits for it
    try:
        channel = Channel(fd)
        try:
            L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != 0:  # the worker is outside this PID namespace: 0 while it lives
                os._exit(EXIT_SETUP_FAILED)
        except BaseException as exc:
            _fail(channel, "B", "set_parent_death_signal", exc)
        steps: list[tuple[str, Callable[[], None]]] = [
            ("close_inherited_fds", lambda: close_inherited_fds({0, 1, 2, fd})),
            ("enter_cgroup", lambda: cgroups.join(config.cgroup_files)),
            ("mount_proc_for_pid_namespace", _mount_own_proc),
            ("unshare_namespaces", lambda: L.unshare(config.clone_flags & ~L.CLONE_NEWPID)),
            ("write_id_maps", lambda: write_id_maps(0, 0)),
        ]
        _run_steps(channel, "B", steps)
        _run_steps(channel, "B", [(step.name, step.run) for step in prebuilt_plan_steps(config.plan)])
        _run_steps(channel, "B", [("harden_init", lambda: harden_init(config.cap_last_cap))])
        try:
            pidfd = os.pidfd_open(os.getpid())
        except OSError as exc:
            _fail(channel, "B", "open_pidfd", exc)
        with socket.socket(fileno=channel.fd) as sock:
            socket.send_fds(sock, [wire.encode({"kind": "ready"})], [pidfd])
        os.close(pidfd)
        while True:
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass
            signal.sigwait({signal.SIGCHLD})  # blocked from the start: an orphan's exit is never missed
    finally:
        os._exit(EXIT_INTERNAL_ERROR)


def _mount_own_proc() -> None:
    """A mount namespace of the builder's, with a /proc of this PID namespace over the host's."""
    L.unshare(L.CLONE_NEWNS)
    L.mount(b"proc", b"/proc", b"proc", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)


def prebuilt_plan_steps(plan: MountPlan) -> tuple[Step, ...]:
    """The plan's steps, with /proc bound from the one B' mounted before entering its user namespace."""
    return tuple(
        BindProc(step.target) if isinstance(step, MountFs) and step.fstype == "proc" else step for step in plan.steps
    )


def _process_joiner(
    config: SandboxConfig, channel: Channel, p_pid: int, target: Callable[[Channel], None], prebuilt: Prebuilt, kept: set[int]
) -> None:
    """C of a prebuilt sandbox: enter B's namespaces, fork the test process, send its status."""
    _guard_parent(channel, "C", p_pid, in_new_pid_namespace=False)
    _ignore_signals_of_p()
    steps: list[tuple[str, Callable[[], None]]] = [
        ("close_inherited_fds", lambda: close_all_but(kept)),
        ("enter_cgroup", lambda: cgroups.join(config.cgroup_files)),
        ("join_namespaces", lambda: L.setns(prebuilt.pidfd, config.clone_flags)),
    ]
    _run_steps(channel, "C", steps)
    prebuilt.close()
    test_pid = os.fork()  # the first process of this test inside B's PID namespace
    if test_pid == 0:
        try:
            L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)  # P kills C on a timeout or ^C
        except BaseException as exc:
            _fail(channel, "C", "set_parent_death_signal", exc)
        _process_c(config, channel, target)
    _, status = os.waitpid(test_pid, 0)
    try:
        channel.send("test_status", status=status)
    except OSError:
        pass  # P stopped reading at the test's "done"
    os._exit(0)


def _run_joiner(
    config: SandboxConfig, write_fd: int, p_pid: int, target: Callable[[Channel], None], prebuilt: Prebuilt, kept: set[int]
) -> None:
    """Body of C for a prebuilt sandbox; never returns into the caller's (pytest's) code."""
    gc.disable()
    try:
        _process_joiner(config, Channel(write_fd), p_pid, target, prebuilt, kept)
    finally:
        os._exit(EXIT_INTERNAL_ERROR)


def _run_direct(
    config: SandboxConfig, write_fd: int, p_pid: int, target: Callable[[Channel], None], prebuilt: Prebuilt, kept: set[int]
) -> None:
    """Body of the test process forked by P straight into a prebuilt sandbox's PID namespace."""
    gc.disable()  # C turns it back on for the test
    try:
        channel = Channel(write_fd)
        try:
            L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != 0:  # P is outside this PID namespace: 0 while it lives, B' (1) once it died
                os._exit(EXIT_SETUP_FAILED)
        except BaseException as exc:
            _fail(channel, "C", "set_parent_death_signal", exc)
        _ignore_signals_of_p()
        steps: list[tuple[str, Callable[[], None]]] = [
            ("close_inherited_fds", lambda: close_all_but(kept)),
            ("enter_cgroup", lambda: cgroups.join(config.cgroup_files)),
            ("join_namespaces", lambda: L.setns(prebuilt.pidfd, config.clone_flags & ~L.CLONE_NEWPID)),
        ]
        _run_steps(channel, "C", steps)
        prebuilt.close()
        _process_c(config, channel, target)
    finally:
        os._exit(EXIT_INTERNAL_ERROR)


class _PidNamespaceSwitch:
    """P forks the test straight into a prebuilt sandbox's PID namespace when it may (as root).

    setns(CLONE_NEWPID) changes only the namespace of the caller's *next children*; P sets it for
    one fork and restores its own right after. It needs CAP_SYS_ADMIN in P's own user namespace,
    so without it (rootless) P forks a C that joins the namespaces and forks the test (one more
    fork of pytest).
    """

    def __init__(self) -> None:
        self.usable = os.geteuid() == 0
        self._own: int | None = None

    def fork_into(self, prebuilt: Prebuilt) -> int | None:
        """fork() with the child in *prebuilt*'s PID namespace; None if P may not do that."""
        if not self.usable:
            return None
        if self._own is None:
            self._own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        try:
            L.setns(prebuilt.pidfd, L.CLONE_NEWPID)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                self.usable = False
            return None  # C joins the namespaces and reports what fails there
        try:
            pid = os.fork()
        except BaseException:
            self._restore()
            raise
        if pid:
            self._restore()
        return pid

    def _restore(self) -> None:
        assert self._own is not None
        try:
            L.setns(self._own, L.CLONE_NEWPID)
        except OSError as exc:  # P's later children would land in a dead namespace
            raise RuntimeError(f"nsbox: cannot restore pytest's own PID namespace: {exc}") from exc


_pid_namespace_switch = _PidNamespaceSwitch()


@dataclass
class _Finishing:
    """A sandbox whose test is over but whose processes may still be exiting."""

    pid: int  # P's child: A, or C of a prebuilt sandbox
    prebuilt: Prebuilt | None
    cgroup: cgroups.Cgroup | None
    after: Callable[[], None] | None
    reaped: bool = False

    def poll(self) -> bool:
        """True once every process is gone (then *after* may remove the cgroup)."""
        if not self.reaped:
            try:
                self.reaped = os.waitpid(self.pid, os.WNOHANG)[0] != 0
            except ChildProcessError:
                self.reaped = True
        if not self.reaped or self.prebuilt is None:
            return self.reaped
        # B' is the builder's: its pidfd tells when the namespace is empty (B' exits last), the
        # cgroup when B' itself is out too.
        return self.prebuilt.exited() and (self.cgroup is None or not self.cgroup.pids())

    def finish(self) -> None:
        if self.prebuilt is not None:
            self.prebuilt.close()
        if self.after is not None:
            self.after()

    def kill(self) -> None:
        for kill in (lambda: os.kill(self.pid, signal.SIGKILL), self.prebuilt.kill if self.prebuilt else None):
            if kill is not None:
                try:
                    kill()
                except ProcessLookupError:
                    pass


_unreaped: list[_Finishing] = []


def reap_finished(*, block: bool = False, grace: float = 5.0) -> None:
    """Reap A processes of earlier sandboxes (they exit while their namespaces are torn down),
    then run what waited for them (removing the sandbox's cgroup). With *block*, wait up to
    *grace* seconds, then kill what is left (a test that faked its end)."""
    deadline = time.monotonic() + grace
    while _unreaped:
        for entry in list(_unreaped):
            if entry.poll():
                _unreaped.remove(entry)
                entry.finish()
        if not block or not _unreaped:
            return
        if time.monotonic() > deadline:
            for entry in _unreaped:
                entry.kill()  # B dies with A, the namespaces with B
            deadline = float("inf")
        time.sleep(0.005)


def run(
    config: SandboxConfig,
    target: Callable[[Channel], None],
    *,
    timeout: float | None = None,
    cgroup: cgroups.Cgroup | None = None,
    after_reap: Callable[[], None] | None = None,
    prebuilt: Prebuilt | None = None,
    while_running: Callable[[], None] | None = None,
) -> SandboxResult:
    """Run *target* as the test process inside a sandbox; return what came back over the result pipe.

    Without *prebuilt*, P forks A, which builds a fresh sandbox (A -> B -> C). With it, P forks
    a C that joins the prebuilt sandbox's namespaces and forks the test process there; P owns
    *prebuilt* from now on and kills it when the test is over.

    The pipe reaches EOF when every process of the test is gone; P goes on when the test sent
    "done" (it killed what it left). The processes that exit while the namespaces are torn down
    are reaped later unless their status is needed now, and *after_reap* runs then. After
    *timeout* seconds the test's stack is dumped and the sandbox killed. *while_running* is called
    in P right after the fork: work that need not wait for the test.
    """
    reap_finished()
    read_fd, write_fd = os.pipe()
    stack_read, stack_write = os.pipe() if timeout is not None else (None, None)
    config = replace(config, stack_fd=stack_write)
    p_pid = os.getpid()
    kept: set[int] = set()
    if prebuilt is not None:  # classified here: in the child, every page this touches would be copied
        kept = kept_descriptors({0, 1, 2, write_fd, prebuilt.pidfd} | ({stack_write} if stack_write is not None else set()))
        kept -= {read_fd} | ({stack_read} if stack_read is not None else set())
    # Frozen, the inherited heap is never traversed by the children's garbage collector: a
    # collection in A, B or C would otherwise touch (and copy) every page of pytest's heap.
    gc.freeze()
    direct = False
    try:
        forked = _pid_namespace_switch.fork_into(prebuilt) if prebuilt is not None else None
        direct = forked is not None
        child_pid = forked if forked is not None else os.fork()
    except BaseException:
        for fd in (read_fd, write_fd, stack_read, stack_write):
            if fd is not None:
                os.close(fd)
        if prebuilt is not None:
            prebuilt.kill()
            prebuilt.close()
        raise
    finally:
        if os.getpid() == p_pid:
            gc.unfreeze()
    if child_pid == 0:
        os.close(read_fd)
        if stack_read is not None:
            os.close(stack_read)
        if prebuilt is not None:
            if direct:
                _run_direct(config, write_fd, p_pid, target, prebuilt, kept)
            _run_joiner(config, write_fd, p_pid, target, prebuilt, kept)
        _run_child(config, write_fd, p_pid, target)
    os.close(write_fd)
    if stack_write is not None:
        os.close(stack_write)
    finishing = _Finishing(child_pid, prebuilt, cgroup, after_reap)
    result = SandboxResult()
    reader = wire.Reader()
    deadline = None if timeout is None else time.monotonic() + timeout
    # Forked straight into the sandbox, the test process is P's child: P sees it exit (and then
    # kills what it left, which may hold the pipe open) through a pidfd.
    test_exit = os.pidfd_open(child_pid) if direct else None
    watched = [read_fd] if test_exit is None else [read_fd, test_exit]
    try:
        if while_running is not None:
            while_running()
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            ready = select.select(watched, [], [], max(remaining, 0) if remaining is not None else None)[0]
            if not ready:
                result.timed_out = True
                result.stack = _dump_stack(child_pid if direct else _test_pid(child_pid, prebuilt is not None), stack_read)
                if cgroup is not None:
                    cgroup.kill()
                finishing.kill()  # B dies with A (PDEATHSIG), the namespaces with B
                deadline = None
                continue  # read what is left until EOF
            if test_exit is not None and test_exit in ready and read_fd not in ready:
                _, status = os.waitpid(child_pid, 0)
                finishing.reaped = True
                result.test_status = result.sandbox_status = status
                watched.remove(test_exit)
                if prebuilt is not None:
                    prebuilt.kill()  # what the test left running dies with the namespace
                continue
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            if result.wire_error is not None:
                continue  # drain, so no writer blocks
            try:
                for record in reader.feed(chunk):
                    if record["kind"] == "test_status":
                        result.test_status = int(record.get("status", 0))
                        if prebuilt is not None:
                            prebuilt.kill()  # what the test left running dies with the namespace
                    elif record["kind"] == "done":
                        result.done = True
                    else:
                        result.records.append(record)
            except wire.WireError as exc:
                result.wire_error = str(exc)
            if result.done:
                # The test ran to its end and killed what it left; it exits with 0 right after.
                # The namespaces' teardown need not delay the next test.
                result.test_status = 0
                if prebuilt is not None:
                    prebuilt.kill()
                break
        if reader.pending and result.wire_error is None and not result.timed_out and not result.done:
            result.wire_error = f"truncated record ({reader.pending} bytes) at end of stream"
        if cgroup is not None:
            result.usage = cgroup.usage()  # final: every process of the test is gone
        if result.test_status is None or result.setup_error is not None or result.timed_out:
            if prebuilt is not None:
                prebuilt.kill()
            if not finishing.reaped:
                _, result.sandbox_status = os.waitpid(child_pid, 0)
                finishing.reaped = True
                if direct and result.test_status is None:
                    result.test_status = result.sandbox_status
            _finish_now(finishing)
        else:
            _unreaped.append(finishing)
    except BaseException:
        finishing.kill()
        _finish_now(finishing)
        raise
    finally:
        if test_exit is not None:
            os.close(test_exit)
        os.close(read_fd)
        if stack_read is not None:
            os.close(stack_read)
    return result


def _finish_now(finishing: _Finishing, grace: float = 5.0) -> None:
    """Wait until the sandbox's processes are gone (killing them after *grace*), then finish it."""
    deadline = time.monotonic() + grace
    while not finishing.poll():
        if time.monotonic() > deadline:
            finishing.kill()
            deadline = float("inf")
        time.sleep(0.001)
    finishing.finish()


def _test_pid(child_pid: int, prebuilt: bool) -> int | None:
    """The test process: C (P -> A -> B -> C), or the child of a prebuilt sandbox's C."""
    if prebuilt:
        tests = _children(child_pid)
    else:
        b_pids = _children(child_pid)
        tests = _children(b_pids[0]) if b_pids else []
    return tests[0] if tests else None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def _dump_stack(test_pid: int | None, stack_fd: int | None, wait: float = 2.0) -> str:
    """Ask the test process for its Python stack; what faulthandler wrote."""
    if stack_fd is None or test_pid is None:
        return ""
    try:
        os.kill(test_pid, signal.SIGUSR1)
    except ProcessLookupError:
        return ""
    data = b""
    deadline = time.monotonic() + wait
    quiet = 0.2
    while (remaining := deadline - time.monotonic()) > 0:
        ready = select.select([stack_fd], [], [], min(remaining, quiet if data else remaining))[0]
        if not ready:
            if data:
                break  # the dump is complete when the writer goes quiet
            continue
        chunk = os.read(stack_fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")
