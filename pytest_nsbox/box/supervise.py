"""P's one loop: start the test in a sandbox, read its records, enforce the timeout, end it.

How the test is started is a small strategy (``Spawn``): ``forked.ForkedSpawn`` builds the
sandbox by forks of P (A -> B -> C), ``prebuilt.PrebuiltSpawn`` joins one the builder made
ahead (C, or J -> C rootless). Everything else is the same for both: the result pipe, the
timeout with a stack dump, the cgroup's counters, and the end of the sandbox.

The pipe reaches EOF when every process of the test is gone; P goes on as soon as the test sent
"done" (it killed what it left). The sandbox's processes then exit while the namespaces are
torn down; P reaps them and releases the cgroup while the next test runs (``Supervisor.reap``),
off the test's critical path, unless their status is needed now.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NoReturn, Protocol

from . import wire
from .cgroups import Cgroup, control_devices
from .config import KILL_GRACE, SandboxConfig, SandboxResult, Target
from .forked import ForkedSpawn
from .prebuilt import PidNamespaceSwitch, Prebuilt, PrebuiltSpawn
from .steps import prepare_capability_drop

READ_CHUNK = 1 << 16
STACK_DUMP_WAIT = 2.0  # seconds the test gets to write its stack on a timeout
STACK_DUMP_QUIET = 0.2  # the dump is complete when the writer is quiet this long
REAP_POLL = 0.005  # seconds between polls of sandboxes that are still exiting


class Spawn(Protocol):
    """How the test process is started in a sandbox, and how P watches and ends it."""

    @property
    def process(self) -> str:
        """P's child in the process model's diagram (A, C or J; see forked.py, prebuilt.py)."""

    def keep(self) -> set[int]:
        """Descriptors P's child keeps besides the pipes, sorted in P before the fork."""

    def fork(self) -> int:
        """fork() P's child: its pid in P, 0 in the child."""

    def child(self, config: SandboxConfig, write_fd: int, kept: set[int], p_pid: int, target: Target) -> NoReturn:
        """Body of P's child; never returns into pytest's code."""

    def watch(self, child_pid: int) -> int | None:
        """A pidfd that polls readable when the test process exits, if it is P's child."""

    def test_pid(self, child_pid: int) -> int | None:
        """The test process (for the stack dump), if it can be found."""

    def test_finished(self) -> None:
        """The test's status is known: end what it left running."""

    def kill(self) -> None:
        """Kill the sandbox (P's child is killed separately)."""

    def gone(self) -> bool:
        """Once P's child is reaped: whether every other process of the sandbox is gone too."""

    def close(self) -> None:
        """Release what the spawn holds (a pidfd)."""


@dataclass
class _Ending:
    """A sandbox whose test is over but whose processes may still be exiting."""

    pid: int  # P's child
    spawn: Spawn
    cgroup: Cgroup | None
    reaped: bool = False

    def poll(self) -> bool:
        """True once every process is gone."""
        if not self.reaped:
            try:
                self.reaped = os.waitpid(self.pid, os.WNOHANG)[0] != 0
            except ChildProcessError:
                self.reaped = True
        return self.reaped and self.spawn.gone() and (self.cgroup is None or not self.cgroup.pids())

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.spawn.kill()

    def finish(self) -> None:
        self.spawn.close()
        if self.cgroup is not None:
            self.cgroup.release()

    def finish_now(self, grace: float = KILL_GRACE) -> None:
        """Wait until the processes are gone (killing them after *grace* seconds), then finish."""
        deadline = time.monotonic() + grace
        while not self.poll():
            if time.monotonic() > deadline:
                self.kill()
                deadline = float("inf")
            time.sleep(0.001)
        self.finish()


class Supervisor:
    """P's side of every sandbox of one process: runs tests, ends sandboxes, reaps them later."""

    def __init__(self) -> None:
        self._ending: list[_Ending] = []
        self._switch = PidNamespaceSwitch()
        control_devices()  # read once in P, before any fork
        self._prepared_capabilities: int | None = None

    def run(
        self,
        config: SandboxConfig,
        target: Target,
        *,
        prebuilt: Prebuilt | None = None,
        timeout: float | None = None,
        cgroup: Cgroup | None = None,
        while_running: Callable[[], None] | None = None,
    ) -> SandboxResult:
        """Run *target* as the test process inside a sandbox; return what came back.

        Without *prebuilt* the sandbox is built now (forked form); with it, the test joins it
        and P owns *prebuilt* from now on. P owns *cgroup* too: it is killed on a timeout, its
        counters read at the end, and it is released once every process is gone. After
        *timeout* seconds the test's stack is dumped and the sandbox killed. *while_running* is
        called in P right after the fork: work that need not wait for the test.
        """
        if self._prepared_capabilities != config.cap_last_cap:
            prepare_capability_drop(config.cap_last_cap)
            self._prepared_capabilities = config.cap_last_cap
        spawn: Spawn = ForkedSpawn() if prebuilt is None else PrebuiltSpawn(prebuilt, self._switch)
        p_pid = os.getpid()
        pipes: set[int] = set()
        try:
            read_fd, write_fd = os.pipe()
            pipes |= {read_fd, write_fd}
            stack_read, stack_write = os.pipe() if timeout is not None else (None, None)
            pipes |= {fd for fd in (stack_read, stack_write) if fd is not None}
            # The test sees P's collector as it is (an unsandboxed test would): nothing frozen for
            # it, enabled or not as in P. Disabled across the fork, so that no collection runs in a
            # child before it decides (A, B and J never collect: they would copy pytest's heap).
            gc_enabled = gc.isenabled()
            config = replace(config, stack_fd=stack_write, gc_enabled=gc_enabled)
            kept = (spawn.keep() - pipes) | {write_fd} | ({stack_write} if stack_write is not None else set())
            gc.disable()
            try:
                child_pid = spawn.fork()
            finally:
                if gc_enabled and os.getpid() == p_pid:
                    gc.enable()
        except BaseException:
            for fd in pipes:
                os.close(fd)
            spawn.kill()
            spawn.close()
            if cgroup is not None:
                cgroup.discard()
            raise
        if child_pid == 0:
            os.close(read_fd)
            if stack_read is not None:
                os.close(stack_read)
            spawn.child(config, write_fd, kept, p_pid, target)
        os.close(write_fd)
        if stack_write is not None:
            os.close(stack_write)
        ending = _Ending(child_pid, spawn, cgroup)
        try:
            result = self._watch(ending, read_fd, stack_read, timeout, while_running)
        except BaseException:
            ending.kill()
            ending.finish_now()
            raise
        finally:
            os.close(read_fd)
            if stack_read is not None:
                os.close(stack_read)
        return result

    def _watch(
        self,
        ending: _Ending,
        read_fd: int,
        stack_read: int | None,
        timeout: float | None,
        while_running: Callable[[], None] | None,
    ) -> SandboxResult:
        spawn, child_pid, cgroup = ending.spawn, ending.pid, ending.cgroup
        result = SandboxResult()
        reader = wire.Reader()
        deadline = None if timeout is None else time.monotonic() + timeout
        test_exit = spawn.watch(child_pid)
        watched = [read_fd] if test_exit is None else [read_fd, test_exit]
        try:
            if while_running is not None:
                while_running()
            self.reap()  # earlier sandboxes, while this test runs
            while True:
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
                ready = select.select(watched, [], [], remaining)[0]
                if not ready:
                    result.timed_out = True
                    result.stack = _dump_stack(spawn.test_pid(child_pid), stack_read)
                    if cgroup is not None:
                        cgroup.kill()
                    ending.kill()
                    deadline = None
                    continue  # read what is left until EOF
                if test_exit is not None and test_exit in ready and read_fd not in ready:
                    _, status = os.waitpid(child_pid, 0)
                    ending.reaped = True
                    result.test_status = result.sandbox_status = status
                    watched.remove(test_exit)
                    spawn.test_finished()
                    continue
                chunk = os.read(read_fd, READ_CHUNK)
                if not chunk:
                    break
                if result.wire_error is None:  # else drain, so no writer blocks
                    self._take_records(reader, chunk, result, spawn)
                if result.done:
                    # The test ran to its end and killed what it left; it exits with 0 right
                    # after. The namespaces' teardown need not delay the next test.
                    result.test_status = 0
                    spawn.test_finished()
                    break
        finally:
            if test_exit is not None:
                os.close(test_exit)
        if reader.pending and result.wire_error is None and not result.timed_out and not result.done:
            result.wire_error = f"truncated record ({reader.pending} bytes) at end of stream"
        if cgroup is not None:
            result.usage = cgroup.usage()  # final: every process of the test is gone
        if result.test_status is None or result.setup_error is not None or result.timed_out:
            spawn.kill()
            if not ending.reaped:
                _, result.sandbox_status = os.waitpid(child_pid, 0)
                ending.reaped = True
                if spawn.process == "C" and result.test_status is None:
                    result.test_status = result.sandbox_status
            ending.finish_now()
        else:
            self._ending.append(ending)
        return result

    @staticmethod
    def _take_records(reader: wire.Reader, chunk: bytes, result: SandboxResult, spawn: Spawn) -> None:
        try:
            for record in reader.feed(chunk):
                if record["kind"] == "test_status":
                    result.test_status = int(record.get("status", 0))
                    spawn.test_finished()
                elif record["kind"] == "done":
                    result.done = True
                else:
                    result.records.append(record)
        except wire.WireError as exc:
            result.wire_error = str(exc)

    def reap(self, *, block: bool = False, grace: float = KILL_GRACE) -> None:
        """Finish sandboxes whose processes are gone (reap P's child, release the cgroup). With
        *block*, wait up to *grace* seconds, then kill what is left (a test that faked its end)."""
        deadline = time.monotonic() + grace
        while self._ending:
            for ending in list(self._ending):
                if ending.poll():
                    self._ending.remove(ending)
                    ending.finish()
            if not block or not self._ending:
                return
            if time.monotonic() > deadline:
                for ending in self._ending:
                    ending.kill()
                deadline = float("inf")
            time.sleep(REAP_POLL)

    def close(self) -> None:
        self.reap(block=True)
        self._switch.close()


def run_once(config: SandboxConfig, target: Target, *, cgroup: Cgroup | None = None) -> SandboxResult:
    """Build a sandbox now, run *target* in it, and wait until every process of it is gone."""
    supervisor = Supervisor()
    try:
        return supervisor.run(config, target, cgroup=cgroup)
    finally:
        supervisor.close()


def _dump_stack(test_pid: int | None, stack_fd: int | None, wait: float = STACK_DUMP_WAIT) -> str:
    """Ask the test process for its Python stack; what faulthandler wrote."""
    if stack_fd is None or test_pid is None:
        return ""
    try:
        os.kill(test_pid, signal.SIGUSR1)
    except ProcessLookupError:
        return ""
    data = b""
    deadline = time.monotonic() + wait
    while (remaining := deadline - time.monotonic()) > 0:
        ready = select.select([stack_fd], [], [], min(remaining, STACK_DUMP_QUIET if data else remaining))[0]
        if not ready:
            if data:
                break  # the dump is complete when the writer goes quiet
            continue
        chunk = os.read(stack_fd, READ_CHUNK)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")
