"""The process model: P forks A (unsharer), A forks B (PID 1, builds the root), B forks C (the test).

    P  pytest            forks A, reads the result pipe to EOF, waits for A; kills A on interrupt
    A  unsharer          closes inherited descriptors, unshare(USER|NS|PID|NET|UTS|IPC|CGROUP),
                         writes its id maps, forks B, exits with B's status
    B  PID 1             runs the mount plan, pivot_root, hostname, loopback; forks C; reaps every
                         orphan until C exits; sends C's wait status
    C  the test          drops capabilities, verifies it is inside, runs the target

A child never raises across the fork: a failure is a ``setup_error`` record plus ``os._exit``.
When C ends, B exits and the PID namespace takes every leftover process with it; the mount
namespace takes the scratch tmpfs (the writable layer) with it.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import select
import signal
import stat
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Final

from . import _linux as L
from . import cgroups, subids, wire
from .mounts import ROOT_SOURCE, MountPlan

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


def close_inherited_fds(keep: Iterable[int]) -> None:
    """Close descriptors that could reach outside: directories, sockets, pipes, anon inodes.

    Kept: *keep*, regular files and character devices (pytest's capture files, /dev/null, a
    tty), and duplicates of stdin/stdout/stderr (pytest's capture saves them). xdist's channel
    is a pair of pipes that are none of these.
    """
    keep_set = set(keep)
    std_files = set()
    for fd in (0, 1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        std_files.add((st.st_dev, st.st_ino))
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep_set:
            continue
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode) or (st.st_dev, st.st_ino) in std_files:
            continue
        os.close(fd)


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
    try:
        L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
        if not _parent_is(a_pid):
            os._exit(EXIT_SETUP_FAILED)
    except BaseException as exc:
        _fail(channel, "B", "set_parent_death_signal", exc)
    _run_steps(channel, "B", [(step.name, step.run) for step in config.plan.steps])
    c_pid = os.fork()
    if c_pid == 0:
        _process_c(config, channel, target)
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


def _process_a(config: SandboxConfig, channel: Channel, p_pid: int, target: Callable[[Channel], None]) -> None:
    try:
        L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != p_pid:
            os._exit(EXIT_SETUP_FAILED)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # P handles ^C and kills the sandbox
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # only C dumps its stack on a timeout
    except BaseException as exc:
        _fail(channel, "A", "set_parent_death_signal", exc)
    keep = {0, 1, 2, channel.fd} | ({config.stack_fd} if config.stack_fd is not None else set())
    steps: list[tuple[str, Callable[[], None]]] = [
        ("close_inherited_fds", lambda: close_inherited_fds(keep)),
        ("enter_cgroup", lambda: cgroups.join(config.cgroup_files)),
        *unshare_steps(config),
    ]
    _run_steps(channel, "A", steps)
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


_unreaped: list[tuple[int, Callable[[], None] | None]] = []


def reap_finished(*, block: bool = False, grace: float = 5.0) -> None:
    """Reap A processes of earlier sandboxes (they exit while their namespaces are torn down),
    then run what waited for them (removing the sandbox's cgroup). With *block*, wait up to
    *grace* seconds, then kill what is left (a test that faked its end)."""
    deadline = time.monotonic() + grace
    while _unreaped:
        for entry in list(_unreaped):
            pid, after = entry
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                _unreaped.remove(entry)
                if after is not None:
                    after()
        if not block or not _unreaped:
            return
        if time.monotonic() > deadline:
            for pid, _ in _unreaped:
                try:
                    os.kill(pid, signal.SIGKILL)  # B dies with A, the namespaces with B
                except ProcessLookupError:
                    pass
            deadline = float("inf")
        time.sleep(0.005)


def run(
    config: SandboxConfig,
    target: Callable[[Channel], None],
    *,
    timeout: float | None = None,
    cgroup: cgroups.Cgroup | None = None,
    after_reap: Callable[[], None] | None = None,
) -> SandboxResult:
    """Run *target* as C inside a fresh sandbox; return what came back over the result pipe.

    The pipe reaches EOF when B has exited (after killing everything the test left); A, which
    waits for the namespaces' teardown, is reaped later unless its status is needed now, and
    *after_reap* runs then. After *timeout* seconds C's stack is dumped and the sandbox killed.
    """
    reap_finished()
    read_fd, write_fd = os.pipe()
    stack_read, stack_write = os.pipe() if timeout is not None else (None, None)
    config = replace(config, stack_fd=stack_write)
    p_pid = os.getpid()
    # Frozen, the inherited heap is never traversed by the children's garbage collector: a
    # collection in A, B or C would otherwise touch (and copy) every page of pytest's heap.
    gc.freeze()
    try:
        a_pid = os.fork()
    except BaseException:
        for fd in (read_fd, write_fd, stack_read, stack_write):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        if os.getpid() == p_pid:
            gc.unfreeze()
    if a_pid == 0:
        os.close(read_fd)
        if stack_read is not None:
            os.close(stack_read)
        _run_child(config, write_fd, p_pid, target)
    os.close(write_fd)
    if stack_write is not None:
        os.close(stack_write)
    result = SandboxResult()
    reader = wire.Reader()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and (remaining <= 0 or not select.select([read_fd], [], [], remaining)[0]):
                result.timed_out = True
                result.stack = _dump_stack(a_pid, stack_read)
                if cgroup is not None:
                    cgroup.kill()
                os.kill(a_pid, signal.SIGKILL)  # B dies with A (PDEATHSIG), the namespaces with B
                deadline = None
                continue  # read what is left until EOF
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            if result.wire_error is not None:
                continue  # drain, so no writer blocks
            try:
                for record in reader.feed(chunk):
                    if record["kind"] == "test_status":
                        result.test_status = int(record.get("status", 0))
                    elif record["kind"] == "done":
                        result.done = True
                    else:
                        result.records.append(record)
            except wire.WireError as exc:
                result.wire_error = str(exc)
            if result.done:
                # C ran to its end and killed what it left; it exits with 0 right after. The
                # namespaces' teardown (C, B, A exiting) need not delay the next test.
                result.test_status = 0
                break
        if reader.pending and result.wire_error is None and not result.timed_out and not result.done:
            result.wire_error = f"truncated record ({reader.pending} bytes) at end of stream"
        if cgroup is not None:
            result.usage = cgroup.usage()  # final: every process of the test is gone
        if result.test_status is None or result.setup_error is not None or result.timed_out:
            _, result.sandbox_status = os.waitpid(a_pid, 0)
            if after_reap is not None:
                after_reap()
        else:
            _unreaped.append((a_pid, after_reap))
    except BaseException:
        os.kill(a_pid, signal.SIGKILL)
        os.waitpid(a_pid, 0)
        if after_reap is not None:
            after_reap()
        raise
    finally:
        os.close(read_fd)
        if stack_read is not None:
            os.close(stack_read)
    return result


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def _dump_stack(a_pid: int, stack_fd: int | None, wait: float = 2.0) -> str:
    """Ask C (A's grandchild: A -> B -> C) for its Python stack; what faulthandler wrote."""
    if stack_fd is None:
        return ""
    b_pids = _children(a_pid)
    c_pids = _children(b_pids[0]) if b_pids else []
    if not c_pids:
        return ""
    try:
        os.kill(c_pids[0], signal.SIGUSR1)
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
