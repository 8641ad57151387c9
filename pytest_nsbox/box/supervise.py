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

import contextlib
import gc
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NoReturn, Protocol

from . import subids, wire
from .cgroups import Cgroup, control_devices
from .config import INTERACTIVE, KILL_GRACE, SandboxConfig, SandboxResult, Target
from .diskscratch import DiskWatch, ScratchHelper, remove_tree
from .forked import ForkedSpawn
from .prebuilt import PidNamespaceSwitch, Prebuilt, PrebuiltSpawn
from .steps import prepare_capability_drop

log = logging.getLogger(__name__)
READ_CHUNK = 1 << 16
STACK_DUMP_WAIT = 2.0  # seconds the test gets to write its stack on a timeout
STACK_DUMP_QUIET = 0.2  # the dump is complete when the writer is quiet this long
MAX_STACK_BYTES = 1 << 20  # of faulthandler's output kept for the report
STACK_DRAIN_READS = 64  # reads of faulthandler's pipe once the test is over (a full pipe is 1 to 16)
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


class _Deadline:
    """The test's timeout. The clock stops while the test waits for the user in a debugger."""

    def __init__(self, timeout: float | None) -> None:
        self.left = timeout  # seconds of the test's own time; None: no timeout
        self.since: float | None = time.monotonic()  # None: stopped

    def remaining(self) -> float | None:
        """Seconds until the timeout (0: it is over); None while there is none or the clock stops."""
        if self.left is None or self.since is None:
            return None
        return max(self.left - (time.monotonic() - self.since), 0)

    def stop(self) -> None:
        if self.left is not None and self.since is not None:
            self.left -= time.monotonic() - self.since
            self.since = None

    def start(self) -> None:
        if self.since is None:
            self.since = time.monotonic()

    def clear(self) -> None:
        self.left = None


class _TerminalInterrupt:
    """^C on the terminal reaches P and the test alike (one process group). Once the test has been
    in a debugger, it is the debugger's (pdb prints ``--KeyboardInterrupt--`` at its prompt, or stops
    the running test): P ignores SIGINT until the test ends, instead of killing the sandbox.

    The test announces the debugger on the result pipe before pdb prompts, but P may not have read
    that yet when the user presses ^C. So while the test runs, SIGINT only wakes P's loop (a pipe
    of its own); the loop reads what the test sent so far, then ``decide``s: the debugger's, or
    P's previous handler (pytest's KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self.handed_over = False
        self.pending = False  # a SIGINT came; decide once the result pipe is read
        self.fd: int | None = None  # readable after a SIGINT
        self._write_fd: int | None = None
        self._previous: Any = None
        try:
            self._previous = signal.getsignal(signal.SIGINT)
            read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.fd = read_fd
            signal.signal(signal.SIGINT, self._wake)
        except ValueError:  # not the main thread: P gets no SIGINT here anyway
            self.close_pipe()

    def _wake(self, signum: int, frame: object) -> None:
        try:
            os.write(self._write_fd, b"\0")  # type: ignore[arg-type]
        except OSError:
            pass  # full: P wakes anyway

    def woken(self) -> None:
        """The loop saw the pipe readable: a SIGINT to decide on."""
        try:
            while os.read(self.fd, 64):  # type: ignore[arg-type]
                pass
        except BlockingIOError:
            pass
        self.pending = True

    def hand_to_test(self) -> None:
        self.handed_over = True

    def decide(self) -> None:
        """The SIGINT was the debugger's (ignored here), or P's previous handler gets it."""
        self.pending = False
        if self.handed_over:
            return
        previous = self._previous
        if callable(previous):
            previous(signal.SIGINT, None)  # pytest's: KeyboardInterrupt
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt

    def take_back(self) -> None:
        if self.fd is not None:
            signal.signal(signal.SIGINT, self._previous)
        self.close_pipe()

    def close_pipe(self) -> None:
        for fd in (self.fd, self._write_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self._write_fd = None


@dataclass
class _Ending:
    """A sandbox whose test is over but whose processes may still be exiting."""

    pid: int  # P's child
    spawn: Spawn
    cgroup: Cgroup | None
    reaped: bool = False
    scratch_dir: str | None = None  # a disk scratch: removed once every process is gone
    scratches: ScratchHelper | None = None  # who removes it

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
        if self.scratch_dir is not None:
            try:
                if self.scratches is not None:
                    self.scratches.remove(self.scratch_dir)
                else:
                    remove_tree(self.scratch_dir)
            except (OSError, RuntimeError) as exc:  # what is left goes with the run's directory, or the next run's sweep
                log.debug("nsbox: could not remove %s: %s", self.scratch_dir, exc)

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
        # disk scratches: what they hold, and their removal (each a process of its own, on first use)
        ids = lambda: subids.sandbox_ids().mapping  # noqa: E731 - the sandboxes' ids, read when a helper starts
        self._measurer = ScratchHelper(ids, in_process=os.getuid() == 0)
        self._remover = ScratchHelper(ids)

    def run(
        self,
        config: SandboxConfig,
        target: Target,
        *,
        prebuilt: Prebuilt | None = None,
        timeout: float | None = None,
        cgroup: Cgroup | None = None,
        while_running: Callable[[], None] | None = None,
        before_kill: Callable[[SandboxResult], None] | None = None,
        disk_bound: int | None = None,
    ) -> SandboxResult:
        """Run *target* as the test process inside a sandbox; return what came back.

        Without *prebuilt* the sandbox is built now (forked form); with it, the test joins it
        and P owns *prebuilt* from now on. P owns *cgroup* too: it is killed on a timeout, its
        counters read at the end, and it is released once every process is gone. After
        *timeout* seconds the test's stack is dumped and the sandbox killed. *while_running* is
        called in P right after the fork: work that need not wait for the test. *before_kill*
        is called once, when the test is over (or timed out: its processes but PID 1 are killed
        first) and before the sandbox's PID 1 is killed, in the prebuilt form only: its mounts
        are still there (--nsbox-keep copies the writable layers out). With a disk scratch
        (``config.scratch_dir``), P looks at what it holds while the test runs and kills the
        sandbox once that is over *disk_bound* (``result.disk_used``), and removes the directory
        once every process is gone.
        """
        if self._prepared_capabilities != config.cap_last_cap:
            prepare_capability_drop(config.cap_last_cap)
            self._prepared_capabilities = config.cap_last_cap
        spawn: Spawn = ForkedSpawn(config.id_mapping) if prebuilt is None else PrebuiltSpawn(prebuilt, self._switch)
        p_pid = os.getpid()
        pipes: set[int] = set()
        try:
            read_fd, write_fd = os.pipe()
            pipes |= {read_fd, write_fd}
            # faulthandler's pipe: the stack on a timeout (SIGUSR1), the dump of a crash
            stack_read, stack_write = os.pipe()
            pipes |= {stack_read, stack_write}
            # The test sees P's collector as it is (an unsandboxed test would): nothing frozen for
            # it, enabled or not as in P. Disabled across the fork, so that no collection runs in a
            # child before it decides (A, B and J never collect: they would copy pytest's heap).
            gc_enabled = gc.isenabled()
            config = replace(
                config, stack_fd=stack_write if timeout is not None else None, crash_fd=stack_write, gc_enabled=gc_enabled
            )
            kept = (spawn.keep() - pipes) | {write_fd, stack_write} | set(config.stdio_copies)
            if config.network_control_fd is not None:
                kept.add(config.network_control_fd)
            gc.disable()
            started = time.time()
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
            if config.scratch_dir is not None:
                with contextlib.suppress(OSError, RuntimeError):  # else the run's directory takes it along
                    remove_tree(config.scratch_dir)
            raise
        if child_pid == 0:
            os.close(read_fd)
            os.close(stack_read)
            spawn.child(config, write_fd, kept, p_pid, target)
        os.close(write_fd)
        os.close(stack_write)
        ending = _Ending(child_pid, spawn, cgroup, scratch_dir=config.scratch_dir, scratches=self._remover)
        watch = None
        if config.scratch_dir is not None and disk_bound is not None:
            watch = DiskWatch(config.scratch_dir, disk_bound, self._measurer.usage)
        try:
            keep = _Once(before_kill if isinstance(spawn, PrebuiltSpawn) else None)
            result = self._watch(ending, read_fd, stack_read, timeout, while_running, keep, watch)
        except BaseException:
            ending.kill()
            ending.finish_now()
            raise
        finally:
            os.close(read_fd)
            os.close(stack_read)
        result.started = started
        return result

    def _watch(
        self,
        ending: _Ending,
        read_fd: int,
        stack_read: int,
        timeout: float | None,
        while_running: Callable[[], None] | None,
        keep: _Once,
        watch: DiskWatch | None = None,
    ) -> SandboxResult:
        spawn, child_pid, cgroup = ending.spawn, ending.pid, ending.cgroup
        result = SandboxResult()
        reader = wire.Reader()
        stack = bytearray()  # read as it comes: a writer never blocks on a full pipe
        deadline = _Deadline(timeout)
        test_exit = spawn.watch(child_pid)
        watched = [read_fd, stack_read] if test_exit is None else [read_fd, stack_read, test_exit]
        interrupt = _TerminalInterrupt()
        if interrupt.fd is not None:
            watched.append(interrupt.fd)
        try:
            if while_running is not None:
                while_running()
            self.reap()  # earlier sandboxes, while this test runs
            while True:
                wait = 0 if interrupt.pending else deadline.remaining()
                if watch is not None:
                    wait = watch.due() if wait is None else min(wait, watch.due())
                ready = select.select(watched, [], [], wait)[0]
                if interrupt.fd in ready:
                    interrupt.woken()
                    ready.remove(interrupt.fd)
                    if not ready:
                        continue  # read what the test sent meanwhile, then decide
                if interrupt.pending and read_fd not in ready:
                    interrupt.decide()  # the result pipe is read up to now
                    if not ready:
                        continue
                if not ready and watch is not None and deadline.remaining() != 0:
                    used = watch.exceeded()
                    if used is None:
                        continue
                    result.disk_used = used  # over the bound: the sandbox is killed as on a timeout
                    watch = None
                    _note_end(result)
                elif not ready:
                    result.timed_out = True
                    watch = None
                    result.ended = time.time()  # the test ran until now; the dump is P's work
                    stack += _dump_stack(spawn.test_pid(child_pid), stack_read)
                if not ready:
                    if keep.pending and isinstance(spawn, PrebuiltSpawn):
                        _stop_all_but_init(spawn, child_pid, cgroup)
                        keep(result)
                    if cgroup is not None:
                        cgroup.kill()
                    ending.kill()
                    deadline.clear()
                    continue  # read what is left until EOF
                if stack_read in ready and not _read_into(stack_read, stack):
                    watched.remove(stack_read)
                if test_exit is not None and test_exit in ready and read_fd not in ready:
                    _, status = os.waitpid(child_pid, 0)
                    ending.reaped = True
                    result.test_status = result.sandbox_status = status
                    _note_end(result)
                    watched.remove(test_exit)
                    keep(result)
                    spawn.test_finished()
                    continue
                if read_fd not in ready:
                    continue
                chunk = os.read(read_fd, READ_CHUNK)
                if not chunk:
                    _note_end(result)
                    break
                if result.wire_error is None:  # else drain, so no writer blocks
                    self._take_records(reader, chunk, result, spawn, deadline, interrupt, keep)
                if result.done:
                    # The test ran to its end and killed what it left; it exits with 0 right
                    # after. The namespaces' teardown need not delay the next test.
                    result.test_status = 0
                    _note_end(result)
                    keep(result)
                    spawn.test_finished()
                    break
        finally:
            interrupt.take_back()
            if test_exit is not None:
                os.close(test_exit)
        # What the test wrote before it ended. A process it forked may hold the pipe (no EOF) and
        # write on: the drain is bounded.
        for _ in range(STACK_DRAIN_READS):
            if not (select.select([stack_read], [], [], 0)[0] and _read_into(stack_read, stack)):
                break
        result.stack = stack.decode(errors="replace")
        if watch is not None and result.disk_used is None:
            result.disk_used = watch.exceeded()  # what the test wrote since the last look
        if reader.pending and result.wire_error is None and not result.timed_out and not result.done:
            result.wire_error = f"truncated record ({reader.pending} bytes) at end of stream"
        if cgroup is not None:
            result.usage = cgroup.usage()  # final: every process of the test is gone
        if result.test_status is None or result.setup_error is not None or result.timed_out or result.disk_used is not None:
            if result.setup_error is None:
                keep(result)
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
    def _take_records(
        reader: wire.Reader,
        chunk: bytes,
        result: SandboxResult,
        spawn: Spawn,
        deadline: _Deadline,
        interrupt: _TerminalInterrupt,
        keep: _Once,
    ) -> None:
        try:
            for record in reader.feed(chunk):
                if record["kind"] == INTERACTIVE:
                    if record.get("active"):
                        deadline.stop()
                        interrupt.hand_to_test()
                    else:
                        deadline.start()
                elif record["kind"] == "test_status":
                    result.test_status = int(record.get("status", 0))
                    _note_end(result)
                    keep(result)
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
        self._measurer.close()
        self._remover.close()


def run_once(
    config: SandboxConfig,
    target: Target,
    *,
    cgroup: Cgroup | None = None,
    while_running: Callable[[], None] | None = None,
    timeout: float | None = None,
) -> SandboxResult:
    """Build a sandbox now, run *target* in it, and wait until every process of it is gone;
    *while_running* is called in P right after the fork (see ``Supervisor.run``), and after
    *timeout* seconds the sandbox is killed."""
    supervisor = Supervisor()
    try:
        return supervisor.run(config, target, cgroup=cgroup, while_running=while_running, timeout=timeout)
    finally:
        supervisor.close()


class _Once:
    """The before_kill callback of Supervisor.run, called at most once."""

    def __init__(self, callback: Callable[[SandboxResult], None] | None) -> None:
        self.callback = callback

    @property
    def pending(self) -> bool:
        return self.callback is not None

    def __call__(self, result: SandboxResult) -> None:
        callback, self.callback = self.callback, None
        if callback is not None:
            callback(result)


STOP_ROUNDS = 200  # of killing what is left in a timed-out sandbox's cgroup but its PID 1


def _stop_all_but_init(spawn: PrebuiltSpawn, child_pid: int, cgroup: Cgroup | None) -> None:
    """A timed-out test whose sandbox is kept: SIGKILL its processes but the sandbox's PID 1,
    whose mounts are copied out next (without a cgroup, only P's child and the test are found)."""
    from .keep import pid_of_pidfd

    init = pid_of_pidfd(spawn.prebuilt.pidfd)
    for pid in (spawn.test_pid(child_pid), child_pid):
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if cgroup is None or init is None:
        return
    for _ in range(STOP_ROUNDS):
        left = [pid for pid in cgroup.pids() if pid != init]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(REAP_POLL)


def _note_end(result: SandboxResult) -> None:
    """The test is over now, unless it was over already."""
    if result.ended is None:
        result.ended = time.time()


def _read_into(fd: int, buffer: bytearray) -> bool:
    """Read what is there (*fd* is readable), keeping at most MAX_STACK_BYTES; False at EOF."""
    chunk = os.read(fd, READ_CHUNK)
    buffer += chunk[: max(MAX_STACK_BYTES - len(buffer), 0)]  # the test holds the write end: bounded
    return bool(chunk)


def _dump_stack(test_pid: int | None, stack_fd: int, wait: float = STACK_DUMP_WAIT) -> bytes:
    """Ask the test process for its Python stack; what faulthandler wrote."""
    if test_pid is None:
        return b""
    try:
        os.kill(test_pid, signal.SIGUSR1)
    except ProcessLookupError:
        return b""
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
    return data
