"""Sandboxes built ahead of time by a small helper process, the builder.

Building a sandbox's namespaces and root filesystem costs a few milliseconds of forks and mounts.
The builder is a fresh interpreter, started once per pytest process, that imports only the
mechanism modules of this package, so its forks are cheap. It builds the sandbox of the *next*
test while the current one runs:

    S   builder      enters a user namespace of its own (root inside = the caller) and a PID
    │                namespace for its child; waits for W
    └─ W   worker    PID 1 of that PID namespace; reads build requests from P; per request
       │             creates a PID namespace, forks B' into it, switches back, forwards the answer
       └─ B'  PID 1  joins the cgroup, mounts a /proc of its PID namespace, unshares the sandbox's
                     user, mount, network, UTS, IPC and cgroup namespaces, runs the mount plan,
                     sends P a pidfd of itself ("ready"), then reaps orphans until it is killed

When the test starts, P forks it straight into the PID namespace of B' (as root) or forks a
joiner J that enters its namespaces and forks the test (rootless); see prebuilt.py. P kills B' when the
test is over; the PID namespace takes every process inside with it. Nothing of the test ever
runs in S, W or B'.

P -> W messages are pickled requests (W is P's own grandchild); W -> P and B' -> W messages
are wire records. All sockets are SOCK_SEQPACKET: one message, one record (and its pidfd).
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import subprocess

    from .network import NetworkError, NetworkHost, Plumbing

from ..errors import NsboxError
from . import _linux as L
from . import wire
from .config import SandboxConfig
from .mounts import MountPlan
from .prebuilt import MAP_IDS, Prebuilt, build_ahead, map_sandbox_ids
from .steps import enter_user_namespace, fork_into_pid_namespace, open_own_pid_namespace
from .subids import IdMapping

MAX_MESSAGE: Final = 1 << 20
_SERVE: Final = "import sys; sys.path.insert(0, sys.argv[1]); from pytest_nsbox.box.builder import serve; serve()"
STOP_GRACE: Final = 5.0  # seconds the builder gets to exit after P closed its socket


class BuilderError(NsboxError):
    """The builder process could not be started or stopped answering."""


@dataclass(frozen=True)
class Failed:
    """A build that failed: the setup_error record (the step, errno, message) for P to report."""

    record: dict[str, Any]


def _receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One record and the descriptors that came with it; (None, []) at EOF."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    records = list(wire.Reader().feed(data))
    if len(records) != 1:
        for fd in fds:
            os.close(fd)
        raise wire.WireError(f"expected one record per message, got {len(records)}")
    return records[0], fds


# --- P's side ------------------------------------------------------------------------------


class Builder:
    """P's handle on the builder process: submit sandbox configs, take the built sandboxes."""

    def __init__(self, ids: IdMapping | None = None) -> None:
        self._ids = ids  # the sandboxes' full id range (subids.sandbox_ids), or None: one id
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._next_id = 0
        self._answers: dict[int, Prebuilt | Failed] = {}
        self._discarded: set[int] = set()
        self._plans_sent: dict[int, MountPlan] = {}  # id() -> plan, kept alive so ids stay unique
        self._network: NetworkHost | None = None
        self._network_failed: NetworkError | None = None
        self._network_sent = False  # W has N's socket

    def _start(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        import subprocess  # P's side only: the builder never starts processes (a smaller heap to fork)

        package_parent = str(Path(__file__).resolve().parents[2])
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _SERVE, package_parent, str(theirs.fileno()), str(os.getpid())]
                + (self._ids.to_args() if self._ids is not None else []),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                close_fds=True,
            )
        except OSError as exc:
            ours.close()
            raise BuilderError(f"cannot start the sandbox builder ({sys.executable}): {exc}") from None
        finally:
            theirs.close()
        self._sock = ours
        return ours

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def network(self) -> NetworkHost:
        """The run's private network (its process N is started the first time; NetworkError)."""
        if self._network_failed is not None:
            raise self._network_failed  # once per run: every private test then says the same
        if self._network is None:
            from .network import NetworkError, NetworkHost

            self._start()
            assert self._process is not None
            try:
                self._network = NetworkHost(self._process.pid)
            except NetworkError as exc:
                self._network_failed = exc
                raise
        return self._network

    def submit(self, config: SandboxConfig, plumbing: Plumbing | None = None) -> int:
        """Ask for a sandbox built from *config* (on the private network as *plumbing* says, which
        config.network "private" needs); returns a ticket for take() or discard()."""
        sock = self._start()
        ticket = self._next_id
        self._next_id += 1
        # A plan is sent once (it is the bulk of a config); later requests name it by its id.
        plan_id = id(config.plan)
        plan = None if self._plans_sent.get(plan_id) is config.plan else config.plan
        self._plans_sent[plan_id] = config.plan
        # B' needs the plan, the namespaces (network), the cgroup, the capability count and a disk scratch's directory only
        request = (ticket, plan_id, plan, config.network, config.cgroup_files, config.cap_last_cap, plumbing, config.scratch_dir)
        fds = []
        if plumbing is not None and not self._network_sent:
            fds.append(self.network().builder_socket())  # once: W keeps it
        try:
            socket.send_fds(sock, [pickle.dumps(request)], fds)
            if fds:
                self._network_sent = True
                self.network().builder_socket_sent()
        except OSError as exc:
            raise BuilderError(f"the sandbox builder is gone: {exc}") from None
        return ticket

    def take(self, ticket: int) -> Prebuilt | Failed:
        """The sandbox of *ticket* (waits until it is built); the caller owns it from now on."""
        while ticket not in self._answers:
            self._read_answer()
        return self._answers.pop(ticket)

    def discard(self, ticket: int) -> None:
        """Kill the sandbox of *ticket* (now, or when its answer comes)."""
        answer = self._answers.pop(ticket, None)
        if isinstance(answer, Prebuilt):
            answer.kill()
            answer.close()
        elif answer is None:
            self._discarded.add(ticket)

    def _read_answer(self) -> None:
        if self._sock is None:
            raise BuilderError("the sandbox builder is not running")
        try:
            record, fds = _receive(self._sock)
        except (OSError, wire.WireError) as exc:
            raise BuilderError(f"the sandbox builder failed: {exc}") from None
        if record is None:
            status = self._process.wait() if self._process is not None else None
            raise BuilderError(f"the sandbox builder exited (status {status})")
        if record["kind"] == "builder_failed":
            raise BuilderError(str(record.get("message")))
        ticket = int(record.get("ticket", -1))
        answer: Prebuilt | Failed
        if record["kind"] == "ready" and len(fds) == 1:
            root_dev, scratch_fd = record.get("root_dev"), record.get("scratch_fd")
            answer = Prebuilt(
                fds[0],
                root_dev if isinstance(root_dev, int) else None,
                scratch_fd if isinstance(scratch_fd, int) else None,
            )
        else:
            for fd in fds:
                os.close(fd)
            answer = Failed(record)
        if ticket in self._discarded:
            self._discarded.discard(ticket)
            if isinstance(answer, Prebuilt):
                answer.kill()
                answer.close()
        else:
            self._answers[ticket] = answer

    def close(self) -> None:
        """Kill every sandbox not taken, stop the builder (it kills what it is building)."""
        for ticket in list(self._answers):
            self.discard(ticket)
        if self._network is not None:
            self._network.close()
            self._network = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._process is not None:
            import subprocess  # imported already: _start used it

            try:
                self._process.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


# --- the builder process (S) -----------------------------------------------------------------


def serve() -> None:
    """Main of S: enter the builder's namespaces, fork the worker (W) and wait for it."""
    sock = socket.socket(fileno=int(sys.argv[2]))
    parent = int(sys.argv[3])
    L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)  # W and the sandboxes follow: each dies with its parent
    if os.getppid() != parent:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # P handles ^C
    ids = IdMapping.from_args(sys.argv[4:]) if len(sys.argv) > 4 else None
    try:
        # a user namespace of its own (root inside = the caller, with ids: 1..65536 to their range)
        # and a PID namespace for W: W owns every PID namespace it creates for a sandbox and may
        # switch back to its own
        enter_user_namespace(L.CLONE_NEWPID, ids)
        worker = os.fork()
    except (OSError, NsboxError) as exc:
        sock.send(wire.encode({"kind": "builder_failed", "message": f"cannot set up the sandbox builder: {exc}"}))
        return
    if worker == 0:
        _work(sock, ids)
        os._exit(0)
    sock.close()
    os.waitpid(worker, 0)


def _work(sock: socket.socket, ids: IdMapping | None) -> None:
    """Main of W, PID 1 of the builder's PID namespace: build each requested sandbox, answer with
    its pidfd or its setup error, reap the sandboxes' B' processes P killed."""
    L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != 0:  # S is outside this PID namespace
        return
    own_pid_namespace = open_own_pid_namespace()
    L.capset_prepare(0, 0, 0)  # B''s harden_init only calls (see steps.prepare_capability_drop)
    gc.freeze()  # what is imported now is never traversed (and copied) by a collection in B'
    plans: dict[int, MountPlan] = {}
    network: socket.socket | None = None  # to N, the private network's process (P sends it once)
    while True:
        try:
            message, received, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
        except OSError:
            return
        if not message:
            return  # P closed its end: P's pidfds keep its sandboxes; the B' processes die with S
        if received:
            network = socket.socket(fileno=received[0])
        ticket, plan_id, plan, network_mode, cgroup_files, cap_last_cap, plumbing, scratch_dir = pickle.loads(message)
        if plan is not None:
            plans[plan_id] = plan
        config = SandboxConfig(
            plans[plan_id], network_mode, 0, 0, {}, "/", cap_last_cap, cgroup_files, id_mapping=ids, scratch_dir=scratch_dir
        )
        keep_out = (sock.fileno(), *((network.fileno(),) if network is not None else ()))
        answer, fds = _build(config, keep_out, own_pid_namespace)
        if plumbing is not None and answer.get("kind") == "ready" and fds:
            answer = _connect(ticket, answer, fds, network, plumbing)
        try:
            socket.send_fds(sock, [wire.encode({**answer, "ticket": ticket})], fds)
        except OSError:
            return
        finally:
            for fd in fds:
                os.close(fd)
        _reap()


def _connect(
    ticket: int, ready: dict[str, Any], fds: list[int], network: socket.socket | None, plumbing: Plumbing
) -> dict[str, Any]:
    """Have N put the sandbox just built on the private network, while W goes on (P claims it
    from N when its test starts); without N the sandbox is a setup error."""
    if network is None:
        try:
            signal.pidfd_send_signal(fds[0], signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fds.pop())
        message = "the private network's process is not running"
        return {"kind": "setup_error", "process": "B", "step": "connect_network", "errno": None, "message": message}
    from .network import plumb  # W imports it only when a sandbox needs it

    plumb(network, ticket, fds[0], plumbing)
    return ready


def _build(config: SandboxConfig, keep_out: tuple[int, ...], own_pid_namespace: int) -> tuple[dict[str, Any], list[int]]:
    """Fork B' for *config*; its first answer: ready (with its pidfd) or a setup error."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = fork_into_pid_namespace(lambda: L.unshare(L.CLONE_NEWPID), own_pid_namespace)  # B' is its PID 1
    except OSError as exc:
        ours.close()
        theirs.close()
        return {"kind": "setup_error", "process": "B", "step": "fork_pid_namespace", "errno": exc.errno, "message": str(exc)}, []
    if pid == 0:
        for fd in keep_out:
            os.close(fd)
        ours.close()
        build_ahead(config, theirs.detach())
    theirs.close()
    with ours:
        try:
            record, fds = _receive(ours)
            if record is not None and record["kind"] == MAP_IDS:  # B' has unshared: W writes its id maps
                map_sandbox_ids(ours, record)
                record, fds = _receive(ours)
        except (OSError, wire.WireError) as exc:
            record, fds = {"kind": "setup_error", "process": "B", "step": "build", "message": str(exc)}, []
    if record is None:
        _, status = os.waitpid(pid, 0)
        record = {
            "kind": "setup_error",
            "process": "B",
            "step": "build",
            "errno": None,
            "message": f"the sandbox's processes exited before it was built (status {status})",
        }
    return record, fds


def _reap() -> None:
    """Collect the B' processes P killed."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
