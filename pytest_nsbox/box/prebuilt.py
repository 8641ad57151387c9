"""The prebuilt form: a sandbox built ahead of its test (by the builder, see builder.py), joined by it.

    B' PID 1 of one sandbox   forked by the builder into a new PID namespace: joins the cgroup,
                              mounts a /proc of its PID namespace, unshares the sandbox's other
                              namespaces, runs the mount plan, gives up its capabilities, sends a
                              pidfd of itself ("ready"), then reaps orphans until P kills it
    C  the test               as root, forked by P straight into the PID namespace of B'; it joins
                              the other namespaces through a pidfd of B' (steps.run_test then)
    J  the joiner             rootless, P may not enter the PID namespace of B' (that needs
                              CAP_SYS_ADMIN in P's own user namespace): P forks J, which joins
                              every namespace and forks C; J sends C's status

P watches C through a pidfd (as root) or J's records, kills B' when C is done, and the PID
namespace takes every process of the sandbox with it.
"""

from __future__ import annotations

import errno
import gc
import os
import select
import signal
import socket
from collections.abc import Callable
from dataclasses import replace
from typing import NoReturn

from . import _linux as L
from . import cgroups, subids, wire
from .config import EXIT_INTERNAL_ERROR, SandboxConfig, Target
from .mounts import SCRATCH_STEPS, BindProc, MountFs, MountPlan, Step, with_scratch_source
from .steps import Step as NamedStep
from .steps import (
    children,
    clear_environment,
    close_all_but,
    fail,
    fork_into_pid_namespace,
    guard_parent,
    harden_init,
    ignore_signals_of_p,
    join_session_keyring,
    kept_descriptors,
    open_own_pid_namespace,
    reap_forever,
    run_steps,
    run_test,
    write_id_maps,
)
from .wire import Channel


class Prebuilt:
    """A sandbox whose PID 1 (B') waits for a test to join it; P holds a pidfd of B'."""

    def __init__(self, pidfd: int, root_dev: int | None, scratch_fd: int | None = None) -> None:
        self.pidfd = pidfd
        self.root_dev = root_dev  # st_dev of the sandbox's "/" (see steps.verify_inside)
        self.scratch_fd = scratch_fd  # B's descriptor of the scratch tmpfs (see box/keep.py)

    def scratch_path(self) -> str | None:
        """A path that reaches the sandbox's scratch tmpfs from P while B' lives, or None."""
        from .keep import pid_of_pidfd

        pid = pid_of_pidfd(self.pidfd)
        if pid is None or self.scratch_fd is None:
            return None
        return f"/proc/{pid}/fd/{self.scratch_fd}"

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


class PidNamespaceSwitch:
    """P's way into a prebuilt sandbox's PID namespace for one fork (as root only).

    setns(CLONE_NEWPID) changes only the namespace of the caller's *next children*; P enters for
    one fork and restores its own right after. It needs CAP_SYS_ADMIN in P's own user
    namespace: rootless, or once refused, P forks a joiner instead.
    """

    def __init__(self) -> None:
        self.usable = os.geteuid() == 0
        self._own: int | None = None

    def fork_into(self, prebuilt: Prebuilt) -> int | None:
        """fork() with the child in *prebuilt*'s PID namespace; None if P may not enter it."""
        if not self.usable:
            return None
        if self._own is None:
            self._own = open_own_pid_namespace()
        entered = False

        def enter() -> None:
            nonlocal entered
            L.setns(prebuilt.pidfd, L.CLONE_NEWPID)
            entered = True

        try:
            return fork_into_pid_namespace(enter, self._own)
        except OSError as exc:
            if entered:
                raise  # fork() itself failed
            if exc.errno == errno.EPERM:
                self.usable = False
            return None  # the joiner enters the namespaces and reports what fails there

    def close(self) -> None:
        if self._own is not None:
            os.close(self._own)
            self._own = None


class PrebuiltSpawn:
    """P starts the test in *prebuilt*: straight into its PID namespace (C), or through J."""

    def __init__(self, prebuilt: Prebuilt, switch: PidNamespaceSwitch) -> None:
        self.prebuilt = prebuilt
        self.switch = switch
        self.direct = False

    @property
    def process(self) -> str:
        return "C" if self.direct else "J"

    def keep(self) -> set[int]:
        # Sorted here, in P: in the child every page this touches would be copied.
        return kept_descriptors({0, 1, 2, self.prebuilt.pidfd}, cgroups.control_devices())

    def fork(self) -> int:
        pid = self.switch.fork_into(self.prebuilt)
        self.direct = pid is not None
        return pid if pid is not None else os.fork()

    def child(self, config: SandboxConfig, write_fd: int, kept: set[int], p_pid: int, target: Target) -> NoReturn:
        """Body of P's child (C or J); never returns into the caller's (pytest's) code."""
        config = replace(config, root_dev=self.prebuilt.root_dev)
        try:
            if self.direct:
                _process_c(config, Channel(write_fd), self.prebuilt, kept, target)
            else:
                _process_j(config, Channel(write_fd), p_pid, self.prebuilt, kept, target)
        finally:
            os._exit(EXIT_INTERNAL_ERROR)

    def watch(self, child_pid: int) -> int | None:
        # Forked straight into the sandbox, the test process is P's child: P sees it exit (and
        # then kills what it left, which may hold the pipe open) through a pidfd.
        return os.pidfd_open(child_pid) if self.direct else None

    def test_pid(self, child_pid: int) -> int | None:
        if self.direct:
            return child_pid
        tests = children(child_pid)
        return tests[0] if tests else None

    def test_finished(self) -> None:
        self.prebuilt.kill()  # what the test left running dies with the namespace

    def kill(self) -> None:
        self.prebuilt.kill()

    def gone(self) -> bool:
        return self.prebuilt.exited()  # B' exits last: the PID namespace is empty by then

    def close(self) -> None:
        self.prebuilt.close()


def _join_steps(config: SandboxConfig, kept: set[int], prebuilt: Prebuilt, flags: int) -> list[NamedStep]:
    return [
        ("close_inherited_fds", lambda: close_all_but(kept)),
        ("enter_cgroup", lambda: cgroups.join(config.cgroup_files)),
        ("join_namespaces", lambda: L.setns(prebuilt.pidfd, flags)),
    ]


def _process_c(config: SandboxConfig, channel: Channel, prebuilt: Prebuilt, kept: set[int], target: Target) -> None:
    """C forked by P into the PID namespace of B': P is outside it (getppid() 0 while P lives, 1 after)."""
    guard_parent(channel, "C", lambda: os.getppid() == 0)
    ignore_signals_of_p()
    run_steps(channel, "C", _join_steps(config, kept, prebuilt, config.clone_flags & ~L.CLONE_NEWPID))
    prebuilt.close()
    run_test(config, channel, target)


def _process_j(config: SandboxConfig, channel: Channel, p_pid: int, prebuilt: Prebuilt, kept: set[int], target: Target) -> None:
    """J: enter the namespaces of B', fork the test process there, send its status."""
    guard_parent(channel, "J", lambda: os.getppid() == p_pid)
    ignore_signals_of_p()
    run_steps(channel, "J", _join_steps(config, kept, prebuilt, config.clone_flags))
    prebuilt.close()
    test_pid = os.fork()  # the first process of this test inside the PID namespace of B'
    if test_pid == 0:
        try:
            L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)  # P kills J on a timeout or ^C
        except BaseException as exc:
            fail(channel, "C", "set_parent_death_signal", exc)
        run_test(config, channel, target)
    _, status = os.waitpid(test_pid, 0)
    try:
        channel.send("test_status", status=status)
    except OSError:
        pass  # P stopped reading at the test's "done"
    os._exit(0)


# --- B', built by the builder's worker -------------------------------------------------------------


def build_ahead(config: SandboxConfig, fd: int) -> NoReturn:
    """Body of B' (forked by the builder's worker, PID 1 of a new PID namespace). Never returns.

    Builds the sandbox, sends "ready" with a pidfd of itself over *fd* (a SOCK_SEQPACKET socket
    to the worker; setup errors go there as records), then reaps orphans until it is killed.

    B' starts in the builder's user namespace, which owns its PID namespace: there it mounts a
    /proc for that PID namespace (only a process with CAP_SYS_ADMIN over the PID namespace's
    owner may). Then it unshares a user namespace of the sandbox's own with every other
    namespace, and the mount plan binds that /proc instead of mounting one.
    """
    gc.disable()  # a collection would touch (and copy) every page of the builder's heap
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # reap_forever sigwaits for it
    try:
        channel = Channel(fd)
        guard_parent(channel, "B", lambda: os.getppid() == 0)  # the worker is outside this PID namespace
        scratch: list[int] = []
        write_maps: Callable[[], None] = lambda: write_id_maps(0, 0)  # noqa: E731
        if config.id_mapping is not None:
            pid = int(os.readlink("/proc/self"))  # in the worker's /proc (B' mounts its own below)
            write_maps = lambda: _ask_worker_for_id_maps(channel, pid)  # noqa: E731
        steps: list[NamedStep] = [
            ("close_inherited_fds", lambda: _keep_only(fd)),
            ("clear_environment", clear_environment),  # /proc/1/environ: nothing of the builder's (pytest's)
            ("join_session_keyring", join_session_keyring),
            ("enter_cgroup", lambda: cgroups.join(config.cgroup_files)),
            ("mount_proc_for_pid_namespace", _mount_own_proc),
            ("unshare_namespaces", lambda: L.unshare(config.clone_flags & ~L.CLONE_NEWPID)),
            ("write_id_maps", write_maps),
            *(
                (step.name, _holding_scratch(step, config.plan.scratch, scratch))
                for step in prebuilt_plan_steps(config.plan, config.scratch_dir)
            ),
            ("harden_init", lambda: harden_init(config.cap_last_cap)),
        ]
        run_steps(channel, "B", steps)
        try:
            pidfd = os.pidfd_open(os.getpid())
        except OSError as exc:
            fail(channel, "B", "open_pidfd", exc)
        ready = {"kind": "ready", "root_dev": os.stat("/").st_dev, "scratch_fd": scratch[0] if scratch else None}
        with socket.socket(fileno=channel.fd) as sock:
            socket.send_fds(sock, [wire.encode(ready)], [pidfd])
        os.close(pidfd)
        reap_forever()
    finally:
        os._exit(EXIT_INTERNAL_ERROR)


def _holding_scratch(step: Step, scratch: str, held: list[int]) -> Callable[[], None]:
    """*step*'s run; after the scratch tmpfs is mounted, B' opens it and holds it until it dies:
    after pivot_root P reaches the writable layers only through this descriptor (box/keep.py)."""
    if not (step.name in SCRATCH_STEPS and getattr(step, "target", None) == scratch):
        return step.run

    def run_and_hold() -> None:
        step.run()
        held.append(os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))

    return run_and_hold


MAP_IDS = "map_ids"  # record kind: B' asks the worker to write the id maps of its new user namespace
IDS_MAPPED = b"ok"
# each line must lie within one line of the builder's map (0 -> the caller, 1.. -> the range)
SANDBOX_MAP = f"0 0 1\n1 1 {subids.MAPPED_IDS}\n".encode()


def _ask_worker_for_id_maps(channel: Channel, pid: int) -> None:
    """With a full range in the builder's user namespace, the sandbox's maps it too, 0..MAPPED_IDS
    to the same ids there. Only a process with CAP_SETUID in the builder's namespace may write
    that (B' has none there once it has unshared): the worker, root of it, does, without an exec."""
    channel.send(MAP_IDS, pid=pid)
    answer = os.read(channel.fd, 4096)
    if answer != IDS_MAPPED:
        raise OSError(errno.EPERM, answer.decode(errors="replace") or "the builder's worker did not answer")


def map_sandbox_ids(sock: socket.socket, record: dict[str, object]) -> None:
    """In the builder's worker: answer B''s MAP_IDS record (see _ask_worker_for_id_maps)."""
    pid = record.get("pid")
    answer = IDS_MAPPED
    for name in ("uid_map", "gid_map"):
        try:
            fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)  # os-level: a third of open()'s time
            try:
                os.write(fd, SANDBOX_MAP)
            finally:
                os.close(fd)
        except OSError as exc:
            answer = f"writing /proc/{pid}/{name}: {exc}".encode()
            break
    sock.send(answer)


def _keep_only(fd: int) -> None:
    """B' needs nothing of the builder but its socket: no sorting of descriptors (P's stdio is not
    kept either: the sandbox's PID 1 gets /dev/null, so /proc/1/fd cannot reach pytest's stderr)."""
    close_all_but({fd})
    null = os.open("/dev/null", os.O_RDWR)  # the lowest free descriptor: 0
    for std in (0, 1, 2):
        if std != null:
            os.dup2(null, std, inheritable=False)


def _mount_own_proc() -> None:
    """A mount namespace of the builder's, with a /proc of this PID namespace over the host's."""
    L.unshare(L.CLONE_NEWNS)
    L.mount(b"proc", b"/proc", b"proc", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)


def prebuilt_plan_steps(plan: MountPlan, scratch_dir: str | None = None) -> tuple[Step, ...]:
    """The plan's steps, with /proc bound from the one B' mounted before entering its user
    namespace (and the disk scratch's directory, *scratch_dir*, filled in)."""
    steps = with_scratch_source(plan.steps, scratch_dir)
    return tuple(BindProc(step.target) if isinstance(step, MountFs) and step.fstype == "proc" else step for step in steps)
