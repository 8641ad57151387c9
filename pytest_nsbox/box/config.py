"""What a sandbox is built from (computed in P before any fork) and what P learns from it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from . import _linux as L
from . import subids
from .cgroups import Usage
from .mounts import MountPlan
from .wire import Channel

EXIT_SETUP_FAILED: Final = 125  # a step of building the sandbox failed (a setup_error record says which)
EXIT_INTERNAL_ERROR: Final = 126  # an exception escaped a child's body (the test's: an internal_error record says which)
NAMESPACES: Final = ("mnt", "pid", "net", "user", "uts", "ipc", "cgroup")
Target = Callable[[Channel], None]
"""The test's body, run by the test process (C) inside the sandbox; records go out on the channel."""

INTERACTIVE: Final = "interactive"
"""Record kind the test sends with ``active=True`` when it waits for the user (a debugger's prompt)
and ``active=False`` when it goes on: meanwhile the timeout's clock stops, and once the test has
been interactive, ^C on the terminal is the test's (pdb handles it) until the test ends."""

KILL_GRACE: Final = 5.0  # seconds P waits for a killed sandbox's processes to be gone before it kills again


def namespace_ids() -> dict[str, int]:
    """Inode numbers of the caller's namespaces (equal inode = same namespace)."""
    directory = os.open("/proc/self/ns", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return {ns: os.stat(ns, dir_fd=directory).st_ino for ns in NAMESPACES}
    finally:
        os.close(directory)


def read_cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return L.CAP_LAST_CAP


_process_facts: tuple[int, dict[str, int], int] | None = None  # (pid, namespaces, cap_last_cap)


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """Everything the sandbox's processes need, computed in P before the fork."""

    plan: MountPlan
    network: str
    uid: int
    gid: int
    host_namespaces: dict[str, int]
    cwd: str
    cap_last_cap: int
    cgroup_files: tuple[bytes, ...] = ()  # each process that joins writes "0" to each (see cgroups.join)
    stack_fd: int | None = None  # the test's faulthandler dumps its stack here on SIGUSR1 (timeouts)
    crash_fd: int | None = None  # ... and here on a fatal signal, if faulthandler is enabled (pytest enables it)
    oom_first: bool = False  # the test and its children are the OOM killer's first choice, not PID 1
    id_mapping: subids.IdMapping | None = None  # a full id range (sandbox_ids, run steps; see steps.unshare_steps)
    root_dev: int | None = None  # st_dev of the sandbox's "/", read by its PID 1 after pivot_root; the test checks it
    # P's copies of the user's stdin/stdout/stderr (pytest's capture saves them, faulthandler writes to
    # one): kept like fds 0-2, whatever they are (a pipe too), so the debugger reaches the user's terminal
    stdio_copies: tuple[int, ...] = ()
    gc_enabled: bool = True  # whether P's garbage collector was enabled: the test's is the same
    drop_env: tuple[str, ...] = ()  # fnmatch patterns of variables C removes from its environment
    extra_hosts: tuple[tuple[str, str], ...] = ()  # (address, name) C adds to /etc/hosts: the private network's services
    network_control_fd: int | None = None  # C's connection to the private network (a test's nsbox_network)
    scratch_dir: str | None = None  # plan.on_disk: the host directory P made for this sandbox's scratch

    @classmethod
    def create(
        cls,
        plan: MountPlan,
        network: str,
        cwd: str,
        *,
        cgroup_files: tuple[bytes, ...] = (),
        oom_first: bool = False,
        id_mapping: subids.IdMapping | None = None,
        drop_env: tuple[str, ...] = (),
        scratch_dir: str | None = None,
    ) -> SandboxConfig:
        """A config for the calling process (its ids and namespaces, read once per process: a test
        that runs pytest in-process, inside a sandbox, reads its own)."""
        global _process_facts
        if _process_facts is None or _process_facts[0] != os.getpid():
            _process_facts = (os.getpid(), namespace_ids(), read_cap_last_cap())
        _, host_namespaces, cap_last_cap = _process_facts
        return cls(
            plan=plan,
            network=network,
            uid=os.getuid(),
            gid=os.getgid(),
            host_namespaces=host_namespaces,
            cwd=cwd,
            cap_last_cap=cap_last_cap,
            cgroup_files=cgroup_files,
            oom_first=oom_first,
            id_mapping=id_mapping,
            drop_env=drop_env,
            scratch_dir=scratch_dir,
        )

    @property
    def clone_flags(self) -> int:
        flags = L.CLONE_NEWUSER | L.CLONE_NEWNS | L.CLONE_NEWPID | L.CLONE_NEWUTS | L.CLONE_NEWIPC | L.CLONE_NEWCGROUP
        if self.network != "host":
            flags |= L.CLONE_NEWNET
        return flags


@dataclass
class SandboxResult:
    """What P learned: the records in order, the test's wait status, the status of P's child."""

    records: list[dict[str, Any]] = field(default_factory=list)
    test_status: int | None = None
    sandbox_status: int = 0
    wire_error: str | None = None
    timed_out: bool = False
    stack: str = ""  # what the test's faulthandler wrote: its stack at the timeout, or at a crash
    usage: Usage = field(default_factory=Usage)  # read once every process of the test is gone
    done: bool = False  # the test sent its last record: it ran to its end
    started: float | None = None  # time.time() when P started the test process
    ended: float | None = None  # time.time() when the test ended: exited, sent "done", or reached its timeout
    disk_used: int | None = None  # a disk scratch over its bound: the bytes P found in it (it killed the sandbox)

    @property
    def setup_error(self) -> dict[str, Any] | None:
        return next((r for r in self.records if r["kind"] == "setup_error"), None)
