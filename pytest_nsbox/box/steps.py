"""The process steps both forms of the process model share.

Descriptors, id maps, capabilities, PID-1 hardening, keyrings and the environment, the inside
check, the parent-death guard, the reaping loops, the fork into a new PID namespace, and the body
of the test process (C).
A child never raises across the fork: ``run_steps`` turns the first failure into a
``setup_error`` record on the channel and ``os._exit``.
"""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import gc
import os
import signal
import stat
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Final

from . import _linux as L
from . import faults, subids
from .config import EXIT_INTERNAL_ERROR, EXIT_SETUP_FAILED, SandboxConfig, namespace_ids
from .wire import Channel

MAX_FD: Final = 1 << 20  # fs.nr_open's default; close_range(2) takes any upper bound
OOM_SCORE_ADJ_MAX: Final = 1000  # <linux/oom.h>: the OOM killer picks this process first

# Docker's default capability set. CAP_SYS_ADMIN is not in it: without it the test cannot
# re-mount the read-only binds (rootdir, interpreter) read-write or undo any other mount.
KEPT_CAPABILITIES: Final = frozenset(
    {0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31}
)  # CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP

Step = tuple[str, Callable[[], None]]
"""A named action; the name is the ``step`` of the setup_error record when it fails."""


def fail(channel: Channel, process: str, step: str, exc: BaseException, code: int = EXIT_SETUP_FAILED) -> None:
    """Send a setup_error record for *step* of *process* and exit; never returns."""
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


def run_steps(channel: Channel, process: str, steps: Iterable[Step]) -> None:
    """Run named steps in order; the first failure is sent as a setup_error and ends the process."""
    for name, action in steps:
        try:
            faults.inject(process, name)  # a test hook (PYTEST_NSBOX_FAULT): it can only make a step fail
            action()
        except BaseException as exc:
            fail(channel, process, name, exc)


# --- descriptors -----------------------------------------------------------------------------


def kept_descriptors(keep: Iterable[int], excluded_devices: frozenset[int] = frozenset()) -> set[int]:
    """The descriptors a sandbox keeps; every other one could reach outside.

    Kept: *keep* (the caller adds pytest's copies of the user's stdin/stdout/stderr, see
    SandboxConfig.stdio_copies), regular files and character devices (pytest's capture files,
    /dev/null, a tty), and duplicates of the current stdin/stdout/stderr. Directories,
    sockets, pipes, anonymous inodes, namespace files (regular files of nsfs) and files on
    *excluded_devices* (the cgroup filesystems) are not: xdist's channel is a pair of pipes.
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
        if st.st_dev == nsfs or st.st_dev in excluded_devices:
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


def close_inherited_fds(keep: Iterable[int], excluded_devices: frozenset[int] = frozenset()) -> None:
    """Close descriptors that could reach outside (see kept_descriptors)."""
    close_all_but(kept_descriptors(keep, excluded_devices))


# --- ids and capabilities ----------------------------------------------------------------------


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


def enter_user_namespace(flags: int = 0, mapping: subids.IdMapping | None = None) -> None:
    """unshare a user namespace (plus *flags*) in which the caller is root, mapped to itself (and,
    with *mapping*, ids 1..MAPPED_IDS to its range, written from outside: see subids.Mapper)."""
    if mapping is not None:
        mapper = subids.Mapper(mapping)
        mapper.start()
        L.unshare(L.CLONE_NEWUSER | flags)
        mapper.finish()
        return
    uid, gid = os.getuid(), os.getgid()
    L.unshare(L.CLONE_NEWUSER | flags)
    write_id_maps(uid, gid)


def unshare_steps(config: SandboxConfig, mapper: subids.ParentMapper | None = None) -> list[Step]:
    """The steps that create the namespaces and map ids into the user namespace.

    Without ``config.id_mapping`` only the invoking uid/gid is mapped, by the process itself. With
    it (a test's sandbox where subids.sandbox_ids found a range, recipes' run steps) a full map
    is written from outside by the parent, through *mapper* (see subids.ParentMapper):
    directly as root, else by newuidmap/newgidmap.
    """
    unshare: Step = ("unshare_namespaces", lambda: L.unshare(config.clone_flags))
    if config.id_mapping is None:
        return [unshare, ("write_id_maps", lambda: write_id_maps(config.uid, config.gid))]
    if mapper is None:
        raise ValueError("a full id mapping needs the parent's mapper (subids.ParentMapper)")
    return [unshare, ("map_subordinate_ids", mapper.finish)]


def kept_capability_mask(cap_last_cap: int) -> int:
    return sum(1 << cap for cap in KEPT_CAPABILITIES if cap <= cap_last_cap)


def prepare_capability_drop(cap_last_cap: int) -> None:
    """In P, before the forks: build what drop_capabilities' calls need, so the child only calls."""
    L.prctl(L.PR_GET_NO_NEW_PRIVS)  # loads libc and its argument types
    L.capset_prepare(kept_capability_mask(cap_last_cap), kept_capability_mask(cap_last_cap), 0)


def drop_capabilities(cap_last_cap: int) -> None:
    """Docker's default set only, no ambient capabilities, and no_new_privs (bubblewrap)."""
    for cap in range(cap_last_cap + 1):
        if cap not in KEPT_CAPABILITIES:
            L.prctl(L.PR_CAPBSET_DROP, cap)
    L.prctl(L.PR_CAP_AMBIENT, L.PR_CAP_AMBIENT_CLEAR_ALL)
    kept = kept_capability_mask(cap_last_cap)
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


# --- credentials: keyrings, the environment ---------------------------------------------------

KEYRINGS_REFUSED: Final = (errno.ENOSYS, errno.EPERM, errno.EACCES)  # no CONFIG_KEYS, or a seccomp filter / LSM


def join_session_keyring() -> None:
    """Leave pytest's session keyring for a new, empty, anonymous one (runc does so per container).

    Every process inherits its parent's session keyring, and with it every key in it (and the
    user keyring pam_keyinit links there). The user keyrings (@u, @us) are per user namespace
    since Linux 5.3: the sandbox's are its own anyway. If keyctl is refused (a kernel without
    keyrings, a seccomp filter), that is fine only where the caller cannot reach its session
    keyring either (nor, then, can the test); otherwise this fails, and the sandbox with it.
    """
    try:
        L.keyctl(L.KEYCTL_JOIN_SESSION_KEYRING, 0)
    except OSError as exc:
        if exc.errno not in KEYRINGS_REFUSED:
            raise
        if _session_keyring_reachable():
            raise OSError(exc.errno, f"{exc.strerror}. Hint: {JOIN_REFUSED_HINT}") from None


JOIN_REFUSED_HINT: Final = (
    "something (a seccomp filter, a security module) refuses this call but not the session keyring "
    "itself, so the test would keep pytest's; allow keyctl(KEYCTL_JOIN_SESSION_KEYRING)"
)


def _session_keyring_reachable() -> bool:
    try:
        L.keyctl(L.KEYCTL_GET_KEYRING_ID, L.KEY_SPEC_SESSION_KEYRING, 0)
    except OSError:
        return False
    return True


def environment_block() -> tuple[int, bytes]:
    """The address and the bytes of the caller's exec-time environment strings: what
    /proc/<pid>/environ shows, whatever os.environ holds now (a fork shows its parent's)."""
    with open("/proc/self/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    env_start = int(fields[47])  # proc(5): field 50, counted from field 3 (the state) after the comm
    with open("/proc/self/environ", "rb") as handle:
        return env_start, handle.read()


def scrub_environment(drop: Callable[[str], bool]) -> list[str]:
    """Remove the variables whose names *drop* selects: from os.environ (and so from what
    subprocesses get) and from the exec-time block /proc/self/environ shows (zeroed in place:
    nothing points there once unsetenv(3) has removed them). Returns their names."""
    start, block = environment_block()
    dropped: set[str] = set()
    offset = 0
    for entry in block.split(b"\0"):
        name = os.fsdecode(entry.split(b"=", 1)[0])
        if entry and drop(name):
            if name:  # an entry "=x" names nothing unsetenv(3) could take
                os.unsetenv(name)
            ctypes.memset(start + offset, 0, len(entry))
            dropped.add(name)
        offset += len(entry) + 1
    for name in [n for n in os.environ if drop(n)]:
        del os.environ[name]  # unsetenv(3) too
        dropped.add(name)
    return sorted(dropped)


def drop_environment(patterns: tuple[str, ...]) -> None:
    """In C: drop the variables matching any of *patterns* (fnmatch, case-sensitive; ini nsbox_drop_env)."""
    import fnmatch  # imported by pytest already: C has it, the builder need not

    scrub_environment(lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns))


def clear_environment() -> None:
    """In PID 1, which needs none: every variable, so /proc/1/environ shows nothing of pytest's."""
    scrub_environment(lambda name: True)


# --- the inside check ---------------------------------------------------------------------------


def root_mount_source(mountinfo: str) -> str | None:
    """The source of the mount at "/" (the last one stacked there)."""
    source = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/" and " - " in line:
            source = line.split(" - ", 1)[1].split()[1]
    return source


def sandbox_problems(
    host: dict[str, int], inside: dict[str, int], network: str, root_dev: int, sandbox_root_dev: int | None
) -> list[str]:
    """Why the current process is NOT a sandbox built by us (empty list: it is).

    *root_dev* is the device of the caller's "/", *sandbox_root_dev* that of the sandbox's root
    as its PID 1 saw it after pivot_root (a tmpfs or overlay: a device of its own).
    """
    required = ["mnt", "pid", "user", "uts", "ipc"] + (["net"] if network != "host" else [])
    problems = [f"{ns} namespace is the host's" for ns in required if inside.get(ns) == host.get(ns)]
    if sandbox_root_dev is None or root_dev != sandbox_root_dev:
        problems.append(f"the root filesystem (device {root_dev}) is not the sandbox's (device {sandbox_root_dev})")
    return problems


def verify_inside(config: SandboxConfig) -> None:
    """Fail closed: refuse to run the test unless this process is really inside the sandbox."""
    problems = sandbox_problems(config.host_namespaces, namespace_ids(), config.network, os.stat("/").st_dev, config.root_dev)
    if problems:
        raise RuntimeError("not inside a sandbox: " + "; ".join(problems))


# --- parents, signals, reaping -------------------------------------------------------------------


def guard_parent(channel: Channel, process: str, parent_alive: Callable[[], bool]) -> None:
    """Die with the parent (PR_SET_PDEATHSIG), and exit at once if it is already gone.

    *parent_alive* checks what the caller can see of its parent: ``getppid()`` is 0 for a
    parent outside the caller's PID namespace.
    """
    try:
        faults.inject(process, "set_parent_death_signal")
        L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
        if not parent_alive():
            os._exit(EXIT_SETUP_FAILED)
    except BaseException as exc:
        fail(channel, process, "set_parent_death_signal", exc)


def parent_is(pid: int) -> bool:
    """Whether the caller's parent is host pid *pid*, from the host's /proc (still mounted)."""
    with open("/proc/self/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1]) == pid


def children(pid: int) -> list[int]:
    """The children of *pid* (of its main thread), from /proc."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def ignore_signals_of_p() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # P handles ^C and kills the sandbox
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # only the test process dumps its stack on a timeout


LEFTOVERS: Final = "leftovers"  # record kind: processes the test left running (pid, command line)
MAX_LEFTOVERS_LISTED: Final = 50


def leftover_processes() -> list[tuple[int, str]]:
    """In the test process, after the test: the processes of the sandbox's PID namespace still
    running (zombies aside), but for PID 1, the caller and its parent: (pid, command line)."""
    machinery = {1, os.getpid(), os.getppid()}
    found: list[tuple[int, str]] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in machinery:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                status = handle.read().decode(errors="replace")
            if status.rpartition(")")[2].split()[0] == "Z":
                continue
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                command = handle.read(4096).replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue  # it ended meanwhile
        found.append((int(name), command or "[" + status[status.find("(") + 1 : status.rfind(")")] + "]"))
    return sorted(found)


def kill_leftovers() -> None:
    """SIGKILL every process of the PID namespace but the caller and PID 1 (kill(2) with -1)."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing left


def reap_until(pid: int) -> int:
    """As PID 1: reap every orphan until *pid* exits; its wait status."""
    while True:
        try:
            reaped, status = os.wait()
        except ChildProcessError:
            os._exit(EXIT_INTERNAL_ERROR)
        if reaped == pid:
            return status


def reap_all() -> None:
    """Reap every child until none is left."""
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


def reap_forever() -> None:
    """As PID 1 of a prebuilt sandbox: reap orphans until killed. SIGCHLD must be blocked already,
    so that an exit between the last waitpid and sigwait is never missed."""
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        signal.sigwait({signal.SIGCHLD})


def fork_into_pid_namespace(enter: Callable[[], None], own_pid_namespace: int) -> int:
    """fork() with the child in the PID namespace *enter* switches to; the caller's own is restored.

    unshare(CLONE_NEWPID) and setns(CLONE_NEWPID) change only the namespace of the caller's next
    children; *own_pid_namespace* is an fd of the caller's own, to switch back right after.
    """
    enter()
    try:
        pid = os.fork()
    except BaseException:
        _restore_pid_namespace(own_pid_namespace)
        raise
    if pid:
        _restore_pid_namespace(own_pid_namespace)
    return pid


def _restore_pid_namespace(fd: int) -> None:
    try:
        L.setns(fd, L.CLONE_NEWPID)
    except OSError as exc:  # the caller's later children would land in a dead namespace
        raise RuntimeError(f"nsbox: cannot restore the PID namespace: {exc}") from exc


def open_own_pid_namespace() -> int:
    return os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)


# --- the test process (C) ---------------------------------------------------------------------


def run_test(config: SandboxConfig, channel: Channel, target: Callable[[Channel], None]) -> None:
    """Body of the test process, inside the sandbox; never returns.

    Drops capabilities, checks it is inside, runs *target*, then kills what the test left
    running and sends "done": P may go on before the sandbox is torn down.
    """
    channel = Channel(channel.fd)
    if config.gc_enabled:
        gc.enable()  # disabled since the fork; P's heap as P left it (nothing frozen for the test)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    steps: list[Step] = [
        # first: outside its sandbox the test process refuses to run, whatever else would fail there
        ("verify_sandbox", lambda: verify_inside(config)),
        ("drop_capabilities", lambda: drop_capabilities(config.cap_last_cap)),
        ("join_session_keyring", join_session_keyring),
    ]
    if config.drop_env:
        drop_env = config.drop_env
        steps.append(("drop_environment", lambda: drop_environment(drop_env)))
    if config.oom_first:
        steps.append(("prefer_test_for_oom", _prefer_for_oom))
    if config.stack_fd is not None:
        stack_fd = config.stack_fd
        steps.append(("register_stack_dump", lambda: faulthandler.register(signal.SIGUSR1, stack_fd, all_threads=True)))
    if config.crash_fd is not None and faulthandler.is_enabled():
        # pytest's faulthandler plugin writes to a copy of the terminal's stderr; P puts the dump in the report
        crash_fd = config.crash_fd
        steps.append(("redirect_crash_dump", lambda: faulthandler.enable(crash_fd, all_threads=True)))
    if config.extra_hosts:
        hosts = config.extra_hosts
        steps.append(("write_hosts", lambda: add_hosts(hosts)))
    # the host's cwd is inside (mounts.sandbox_paths): never run silently somewhere else
    steps.append(("enter_working_directory", lambda: os.chdir(config.cwd)))
    run_steps(channel, "C", steps)
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
            left = leftover_processes()
            if left:  # P shows them on the report
                channel.send(LEFTOVERS, processes=left[:MAX_LEFTOVERS_LISTED], count=len(left))
            kill_leftovers()  # everything the test started, before P hears that it is done
            channel.send("done")
        os._exit(code)


def add_hosts(hosts: Iterable[tuple[str, str]]) -> None:
    """The private network's services at the top of the sandbox's /etc/hosts (the test's own copy,
    of its init layer; first, so that they win over an image's entry of the same name): started
    after the sandbox was built, they are added when the test starts."""
    with open("/etc/hosts", "r+") as handle:
        image_hosts = handle.read()
        handle.seek(0)
        handle.write("# nsbox: services on the private network\n")
        handle.writelines(f"{address}\t{name}\n" for address, name in hosts)
        handle.write(image_hosts)


def _prefer_for_oom() -> None:
    with open("/proc/self/oom_score_adj", "w") as handle:
        handle.write(str(OOM_SCORE_ADJ_MAX))
