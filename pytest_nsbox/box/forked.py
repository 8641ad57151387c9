"""The forked form: the sandbox is built when its test starts, by forks of P.

Used by recipes' run steps and ``nsbox shell``, with ``nsbox_prebuild = false``, on kernels
before 5.8, and after the builder died:

    P  pytest            forks A, reads the result pipe, reaps A (see supervise)
    A  unsharer          closes inherited descriptors, joins the cgroup,
                         unshare(USER|NS|PID|NET|UTS|IPC|CGROUP), writes its id maps (a full
                         range: P writes them, see subids.ParentMapper), forks B
    B  PID 1             runs the mount plan (pivot_root, hostname, loopback); forks C; gives up
                         its capabilities; reaps every orphan until C exits; kills what is left,
                         sends C's status
    C  the test          steps.run_test
"""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from typing import NoReturn

from . import cgroups, faults, subids
from .config import EXIT_INTERNAL_ERROR, SandboxConfig, Target
from .mounts import with_scratch_source
from .steps import (
    Step,
    children,
    clear_environment,
    close_inherited_fds,
    fail,
    guard_parent,
    harden_init,
    ignore_signals_of_p,
    join_session_keyring,
    kill_leftovers,
    parent_is,
    reap_all,
    reap_until,
    run_steps,
    run_test,
    unshare_steps,
)
from .wire import Channel


class ForkedSpawn:
    """P forks A; A builds the sandbox (A -> B -> C). P's child is A; the pipe ends at B's exit."""

    process = "A"

    def __init__(self, id_mapping: subids.IdMapping | None = None) -> None:
        self.id_mapping = id_mapping  # a full range: P writes A's maps once A has unshared
        self.mapper: subids.ParentMapper | None = None

    def keep(self) -> set[int]:
        return set()  # A sorts the descriptors itself (this form is the fallback: no need to save the copy)

    def fork(self) -> int:
        if self.id_mapping is not None:
            self.mapper = subids.ParentMapper(self.id_mapping)
        try:
            pid = os.fork()
        except OSError:
            if self.mapper is not None:
                self.mapper.close()
            raise
        if pid and self.mapper is not None:
            self.mapper.map_child(pid)  # waits for A to unshare: a few steps of A, no fork of a mapper
        return pid

    def child(self, config: SandboxConfig, write_fd: int, kept: set[int], p_pid: int, target: Target) -> NoReturn:
        """Body of A; never returns into the caller's (pytest's) code."""
        try:
            if self.mapper is not None:
                self.mapper.in_child()
            _process_a(config, Channel(write_fd), p_pid, target, self.mapper)
        finally:
            os._exit(EXIT_INTERNAL_ERROR)

    def watch(self, child_pid: int) -> int | None:
        return None  # the test is A's grandchild: B sends its status

    def test_pid(self, child_pid: int) -> int | None:
        b_pids = children(child_pid)
        tests = children(b_pids[0]) if b_pids else []
        return tests[0] if tests else None

    def test_finished(self) -> None:
        pass  # B kills what C left before it sends C's status

    def kill(self) -> None:
        pass  # killing A is enough: B dies with it (PR_SET_PDEATHSIG), the namespaces with B

    def gone(self) -> bool:
        return True  # once A is reaped: A waits for B, B for every process of the sandbox

    def close(self) -> None:
        pass


def _process_a(config: SandboxConfig, channel: Channel, p_pid: int, target: Target, mapper: subids.ParentMapper | None) -> None:
    guard_parent(channel, "A", lambda: os.getppid() == p_pid)
    ignore_signals_of_p()
    keep = {0, 1, 2, channel.fd, *config.stdio_copies} | {fd for fd in (config.stack_fd, config.crash_fd) if fd is not None}
    keep |= mapper.child_fds() if mapper is not None else set()
    steps: list[Step] = [
        ("close_inherited_fds", lambda: close_inherited_fds(keep, cgroups.control_devices())),
        ("enter_cgroup", lambda: cgroups.join(config.cgroup_files)),
        *unshare_steps(config, mapper),
    ]
    run_steps(channel, "A", steps)
    a_pid = os.getpid()
    b_pid = os.fork()
    if b_pid == 0:
        _process_b(config, channel, a_pid, target)
    os.close(channel.fd)
    _, status = os.waitpid(b_pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _process_b(config: SandboxConfig, channel: Channel, a_pid: int, target: Target) -> None:
    channel = Channel(channel.fd)
    # getppid() is 0 in a new PID namespace whether A lives or not: ask the host's /proc
    guard_parent(channel, "B", lambda: parent_is(a_pid))
    steps: list[Step] = [("join_session_keyring", join_session_keyring)]
    plan_steps = with_scratch_source(config.plan.steps, config.scratch_dir)
    run_steps(channel, "B", steps + [(step.name, step.run) for step in plan_steps])
    config = replace(config, root_dev=os.stat("/").st_dev)  # after pivot_root: the sandbox's root
    c_pid = os.fork()
    if c_pid == 0:
        run_test(config, channel, target)
    # after the fork: C's environment is a copy of this process's
    after_fork: list[Step] = [("harden_init", lambda: harden_init(config.cap_last_cap)), ("clear_environment", clear_environment)]
    for name, action in after_fork:
        try:
            faults.inject("B", name)  # the test hook, as in steps.run_steps
            action()
        except Exception as exc:
            os.kill(c_pid, signal.SIGKILL)
            fail(channel, "B", name, exc)
    # Nothing of the test may run any more when P reads EOF: reap every orphan until C is gone,
    # then kill and reap what C left running. B's exit then tears the namespaces down while P
    # already goes on (P reaps A later).
    status = reap_until(c_pid)
    kill_leftovers()
    reap_all()
    try:
        channel.send("test_status", status=status)
        os.close(channel.fd)  # EOF for P now, not after this process's memory is torn down
    except OSError:
        pass  # P stopped reading at C's "done"
    os._exit(0)
