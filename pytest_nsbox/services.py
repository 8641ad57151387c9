"""Services on the run's private network, host ports into it, and a test's view of it.

``nsbox_service`` (a factory, usable from fixtures of any scope) starts a long-lived command in a
sandbox of its own on the private network (box/network.py) and waits until it is ready; the
service is stopped, and its writable layer discarded, at the end of the scope of the fixture
that started it. ``nsbox_host_ports`` exposes ports of the host's loopback (a server that a
wider fixture runs in pytest's own process) as the same 127.0.0.1:PORT inside sandboxes on the
private network. ``nsbox_network`` is the current test's private network: partition a service,
give its link faults, heal.

Services run in P's sandboxes: they are started in P (pytest's process), never in a sandboxed
test's own process (C), where function-scoped fixtures run.
"""

from __future__ import annotations

import gc
import os
import re
import select
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .box import wire
from .box.config import EXIT_INTERNAL_ERROR
from .box.mounts import HOSTNAME
from .box.network import NetworkError, NetworkHost, Plumbing
from .box.prebuilt import PidNamespaceSwitch, Prebuilt, PrebuiltSpawn
from .budget import Admission, BudgetError
from .errors import NsboxError
from .prepare import Refused, link_faults
from .spec import Network, SandboxSpec, SpecError, network_mode, parse_field

if TYPE_CHECKING:
    from .box.builder import Builder
    from .budget import MemoryLedger
    from .prepare import Preparer

READY_TIMEOUT: Final = 60.0
READY_POLL: Final = 0.05
LOG_TAIL_LINES: Final = 30
LOG_TAIL_BYTES: Final = 16384
SERVICE_NAME: Final = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NOT_IN_SANDBOX: Final = (
    "nsbox_service: {name!r} cannot be started inside a sandboxed test: call it from a fixture that runs in "
    "pytest's own process (scope session, package, module or class); function-scoped fixtures of a "
    "sandboxed test run inside its sandbox"
)
NO_PRIVATE_NETWORK: Final = (
    "nsbox_network: {nodeid} is not on a private network: mark it with network='private' or network=Network(...)"
)


RESERVED_NAMES: Final = frozenset({"localhost", HOSTNAME})
NO_BUILDER: Final = "the private network needs prebuilt sandboxes (ini nsbox_prebuild = true, Linux >= 5.8)"
PASSED_ENVIRONMENT: Final = ("PATH", "LANG", "LC_ALL", "TZ")  # of pytest's: what a command needs to start


def service_environment(image_env: dict[str, str], given: dict[str, str]) -> dict[str, str]:
    """A service's environment, as ``docker run`` gives one: none of pytest's variables (its
    secrets stay out) but PATH and the locale, then the image's Env, then *given*."""
    base = {key: os.environ[key] for key in PASSED_ENVIRONMENT if key in os.environ}
    return {"HOME": "/root", **base, **image_env, **given}


class ServiceError(NsboxError):
    """A service could not be started or did not become ready; the message names it and shows its log."""


_in_sandbox = False  # set in C: services and host ports belong to P
_control: socket.socket | None = None  # C: its connection to N, for nsbox_network
_services_seen: dict[str, str] = {}  # C: the services running when the test started (name -> address)


def enter_test_process(control_fd: int | None, services: Sequence[tuple[str, str]]) -> None:
    """In C, before the test: no service may be started here; the test's nsbox_network connection."""
    global _in_sandbox, _control
    _in_sandbox = True
    _control = socket.socket(fileno=control_fd) if control_fd is not None else None
    _services_seen.clear()
    _services_seen.update((name, address) for address, name in services)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last *lines* lines of a service's log ("" if it has none)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - LOG_TAIL_BYTES))
            data = handle.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class Service:
    """A running service: ``.name``, ``.ip``, ``.logs()``, ``.host_port(PORT)``."""

    def __init__(self, registry: ServiceRegistry, name: str, address: str, log_path: Path) -> None:
        self._registry = registry
        self.name = name
        self.ip = address
        self.log_path = log_path
        self._forwards: dict[int, int] = {}
        self.pid: int | None = None
        self._prebuilt: Prebuilt | None = None
        self._cgroup: Any = None
        self._release: Callable[[], None] | None = None
        self._status: int | None = None  # its process's wait status, once reaped
        self.memory: int | None = None  # its memory limit
        self.stopped = False

    def __repr__(self) -> str:
        return f"<nsbox service {self.name} at {self.ip}{' (stopped)' if self.stopped else ''}>"

    def logs(self) -> str:
        """Everything the service wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def host_port(self, port: int) -> int:
        """A port of the host's 127.0.0.1 forwarded to the service's *port* (for code that runs
        outside sandboxes: an unsandboxed test, a debugger)."""
        if self.stopped:
            raise ServiceError(f"service {self.name!r} is stopped")
        if port not in self._forwards:
            self._forwards[port] = self._registry.network().forward_to_host(self.ip, port)
        return self._forwards[port]

    def running(self) -> bool:
        if self.stopped or self.pid is None or self._status is not None:
            return False
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
        if pid == 0:
            return True
        self._status = status  # reaped: its pid is nobody's to wait for any more
        return False

    def stop(self) -> None:
        """Kill the service's sandbox (its writable layer goes with it) and release its cgroup."""
        if self.stopped:
            return
        self.stopped = True
        self._registry.forget(self)
        if self._prebuilt is not None:
            self._prebuilt.kill()
        if self.pid is not None and self._status is None:
            try:
                self._status = os.waitpid(self.pid, 0)[1]
            except ChildProcessError:
                pass
        if self._prebuilt is not None:
            self._prebuilt.exited(5.0)
            self._prebuilt.close()
        if self._cgroup is not None:
            self._cgroup.discard()
        if self._release is not None:
            self._release()  # its share of the memory budget


class ServiceRegistry:
    """P's services of this session, by name."""

    def __init__(self, preparer: Preparer, builder: Callable[[], Builder | None], budget: MemoryLedger | None = None) -> None:
        self._preparer = preparer
        self._budget = budget  # a service with a memory limit takes its share of the run's budget while it runs
        self._builder = builder  # the runner's (None once lost: the private network is gone with it)
        self.running: dict[str, Service] = {}
        self._switch = PidNamespaceSwitch()

    def network(self) -> NetworkHost:
        builder = self._builder()
        if builder is None:
            raise NetworkError(NO_BUILDER)
        return builder.network()

    def held_memory(self) -> dict[str, int]:
        """The memory limits the running services hold in the budget, by name."""
        return {name: s.memory for name, s in self.running.items() if s.memory is not None and s._release is not None}

    def hosts(self) -> tuple[tuple[str, str], ...]:
        return tuple((service.ip, name) for name, service in self.running.items())

    def forget(self, service: Service) -> None:
        if self.running.get(service.name) is service:
            del self.running[service.name]
            try:
                self.network().forget_service(service.name)
            except NsboxError:
                pass

    def start(
        self,
        name: str,
        *,
        image: str,
        command: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        ready_port: int | None = None,
        ready_log: str | None = None,
        ready_timeout: float = READY_TIMEOUT,
        limits: dict[str, object],
    ) -> Service:
        if _in_sandbox:
            raise ServiceError(NOT_IN_SANDBOX.format(name=name))
        if not isinstance(name, str) or not SERVICE_NAME.match(name):
            raise ServiceError(f"nsbox_service: invalid name {name!r} (lowercase letters, digits and '-', as a host name)")
        if name in self.running:
            raise ServiceError(f"nsbox_service: a service named {name!r} is running already")
        if name in RESERVED_NAMES:
            raise ServiceError(f"nsbox_service: {name!r} names the sandbox itself; choose another name")
        if isinstance(command, str) or not command or not all(isinstance(arg, str) for arg in command):
            raise ServiceError(f"nsbox_service {name!r}: command must be a non-empty list of strings, got {command!r}")
        if env is not None and not (
            isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        ):
            raise ServiceError(f"nsbox_service {name!r}: env must map strings to strings, got {env!r}")
        if ready_port is not None and (
            isinstance(ready_port, bool) or not isinstance(ready_port, int) or not 0 < ready_port < 65536
        ):
            raise ServiceError(f"nsbox_service {name!r}: ready_port must be a port number, got {ready_port!r}")
        if isinstance(ready_timeout, bool) or not isinstance(ready_timeout, int | float) or not ready_timeout > 0:
            raise ServiceError(
                f"nsbox_service {name!r}: ready_timeout must be a positive number of seconds, got {ready_timeout!r}"
            )
        try:
            pattern = re.compile(ready_log) if ready_log is not None else None
        except (re.error, TypeError) as exc:
            raise ServiceError(f"nsbox_service {name!r}: ready_log {ready_log!r} is not a regular expression ({exc})") from None
        spec = self._spec(name, image, limits)
        admission = None
        if self._budget is not None and spec.memory is not None:
            try:
                self._budget.check(spec.memory, self.held_memory())
                admission = self._budget.admit(spec.memory)  # waits, as a test does, while others hold the budget
            except (BudgetError, OSError) as exc:
                raise ServiceError(f"nsbox_service {name!r}: {exc}") from None
        try:
            return self._start(name, spec, command, log_dir, env, ready_port, pattern, ready_timeout, admission)
        except BaseException:
            if admission is not None and self._budget is not None:
                self._budget.release(admission)
            raise

    def _start(
        self,
        name: str,
        spec: SandboxSpec,
        command: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None,
        ready_port: int | None,
        pattern: re.Pattern[str] | None,
        ready_timeout: float,
        admission: Admission | None,
    ) -> Service:
        prepared = self._preparer.prepare_spec(spec, f"service {name!r}")
        if isinstance(prepared, Refused):
            raise ServiceError(f"nsbox_service {name!r}: {prepared.message}")
        built: Prebuilt | None = None
        try:
            network = self.network()
            builder = self._builder()
            if builder is None:
                raise NetworkError(NO_BUILDER)
            config = replace(prepared.config(), cwd="/", extra_hosts=self.hosts())
            ticket = builder.submit(config, Plumbing(link_faults(spec.network)))
            answer = builder.take(ticket)
            if not isinstance(answer, Prebuilt):
                step, message = answer.record.get("step"), answer.record.get("message")
                raise ServiceError(f"nsbox_service {name!r}: its sandbox could not be built: step {step}: {message}")
            built = answer
            address, _ = network.claim(ticket)
            log_dir.mkdir(parents=True, exist_ok=True)
        except BaseException as exc:
            if built is not None:
                built.kill()
                built.close()
            prepared.discard()
            if isinstance(exc, NsboxError | OSError) and not isinstance(exc, ServiceError):
                raise ServiceError(f"nsbox_service {name!r}: {exc}") from None
            raise
        log_path = log_dir / f"{name}.log"
        service = Service(self, name, address, log_path)
        service._prebuilt, service._cgroup, service.memory = built, prepared.cgroup, spec.memory
        if admission is not None and self._budget is not None:
            budget = self._budget
            service._release = lambda: budget.release(admission)
        environment = service_environment(prepared.environment(), env or {})
        try:
            service.pid = self._spawn(config, built, command, log_path, environment, name)
            self.running[name] = service
            network.register_service(name, address)
            self._wait_ready(service, ready_port, pattern, ready_timeout)
        except BaseException:
            service.stop()
            raise
        return service

    @staticmethod
    def _spec(name: str, image: str, limits: dict[str, object]) -> SandboxSpec:
        fields: dict[str, Any] = {"image": parse_field("image", image, f"nsbox_service {name!r}")}
        for key, value in limits.items():
            if key not in ("memory", "pids", "cpus", "disk", "network"):
                raise ServiceError(f"nsbox_service {name!r}: unexpected argument {key!r}")
            if value is not None:
                fields[key] = parse_field(key, value, f"nsbox_service {name!r}")
        network = fields.pop("network", "private")
        if network_mode(network) != "private":
            raise ServiceError(f"nsbox_service {name!r}: a service lives on the private network, not network={network!r}")
        return SandboxSpec(**fields, network=network)

    def _spawn(self, config: Any, built: Prebuilt, command: Sequence[str], log_path: Path, env: dict[str, str], name: str) -> int:
        """Fork the service's process into its sandbox (as a test process is) and exec *command*."""
        spawn = PrebuiltSpawn(built, self._switch)
        read_fd, write_fd = os.pipe()
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        kept = spawn.keep() - {read_fd} | {write_fd, log_fd}
        argv = list(command)
        child_env = env

        def target(channel: Any) -> None:
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            channel.send("started")
            try:
                os.execvpe(argv[0], argv, child_env)
            except OSError as exc:
                os.write(2, f"nsbox: cannot run {argv[0]!r} in service {name!r}: {exc}\n".encode())
                os._exit(127)

        gc_enabled = gc.isenabled()
        gc.disable()
        p_pid = os.getpid()
        try:
            pid = spawn.fork()
        finally:
            if gc_enabled and os.getpid() == p_pid:
                gc.enable()
        if pid == 0:
            os.close(read_fd)
            try:
                spawn.child(config, write_fd, kept, p_pid, target)
            finally:
                os._exit(EXIT_INTERNAL_ERROR)
        os.close(write_fd)
        os.close(log_fd)
        try:
            self._wait_started(read_fd, name, log_path)
        finally:
            os.close(read_fd)
        return pid

    @staticmethod
    def _wait_started(read_fd: int, name: str, log_path: Path) -> None:
        reader = wire.Reader()
        while True:
            ready, _, _ = select.select([read_fd], [], [], READY_TIMEOUT)
            if not ready:
                raise ServiceError(f"nsbox_service {name!r}: its process did not start within {READY_TIMEOUT:g}s")
            data = os.read(read_fd, 65536)
            if not data:
                raise ServiceError(f"nsbox_service {name!r}: its process exited before it started its command")
            for record in reader.feed(data):
                if record["kind"] == "started":
                    return
                if record["kind"] == "setup_error":
                    step, message = record.get("step"), record.get("message")
                    raise ServiceError(f"nsbox_service {name!r}: setting up its sandbox failed at step {step}: {message}")
                if record["kind"] == "internal_error":
                    raise ServiceError(f"nsbox_service {name!r}: {record.get('traceback', '').strip()}")

    def _wait_ready(self, service: Service, port: int | None, pattern: re.Pattern[str] | None, timeout: float) -> None:
        """Until *port* accepts connections and the log matches *pattern* (each if given)."""
        deadline = time.monotonic() + timeout
        network = self.network()
        waiting_for = [w for w in (f"port {port}" if port else "", f"log line {pattern.pattern!r}" if pattern else "") if w]
        while True:
            if not service.running():
                tail = log_tail(service.log_path)
                raise ServiceError(f"nsbox_service {service.name!r}: exited before it was ready; last lines of its log:\n{tail}")
            port_ready = port is None or network.probe(service.ip, port)
            log_ready = pattern is None or pattern.search(service.logs()) is not None
            if port_ready and log_ready:
                return
            if time.monotonic() > deadline:
                tail = log_tail(service.log_path)
                raise ServiceError(
                    f"nsbox_service {service.name!r}: not ready within {timeout:g}s "
                    f"(waiting for {' and '.join(waiting_for)}); last lines of its log:\n{tail}"
                )
            time.sleep(READY_POLL)

    def close(self) -> None:
        for service in list(self.running.values()):
            service.stop()
        self._switch.close()


def logs_for_report(registry: ServiceRegistry | None, fixturenames: Sequence[str]) -> list[tuple[str, Path]]:
    """For a test that uses services (through any fixture): those running now (in C: when the
    test started), with their logs."""
    if registry is None or "nsbox_service" not in fixturenames:
        return []
    return [(name, service.log_path) for name, service in registry.running.items()]


# --- fixtures ---------------------------------------------------------------------------------------


def _requesting_fixture() -> Any:
    """The SubRequest of the fixture whose function is running now (pytest's call_fixture_func
    frame), or None when called from a test."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "call_fixture_func" and "request" in frame.f_locals:
            return frame.f_locals["request"]
        frame = frame.f_back  # type: ignore[assignment]
    return None


class ServiceFactory:
    """``nsbox_service(name, image=..., command=[...], ready_port=PORT, **limits) -> Service``."""

    def __init__(
        self, registry: Callable[[], ServiceRegistry], log_dir: Callable[[], Path], session_finalizers: list[Service]
    ) -> None:
        self._registry = registry
        self._log_dir = log_dir
        self._session = session_finalizers

    def __call__(
        self,
        name: str,
        *,
        image: str = "host",
        command: Sequence[str],
        ready_port: int | None = None,
        ready_log: str | None = None,
        ready_timeout: float = READY_TIMEOUT,
        env: dict[str, str] | None = None,
        **limits: object,
    ) -> Service:
        """Start *command* in a sandbox of *image* named *name* on the private network; wait until
        *ready_port* accepts connections and/or a log line matches *ready_log*, within
        *ready_timeout* seconds. Limits: memory, pids, cpus, disk, network (Network(...))."""
        try:
            service = self._registry().start(
                name,
                image=image,
                command=command,
                log_dir=self._log_dir(),
                env=env,
                ready_port=ready_port,
                ready_log=ready_log,
                ready_timeout=ready_timeout,
                limits=limits,
            )
        except (SpecError, NetworkError) as exc:
            raise ServiceError(f"nsbox_service {name!r}: {exc}") from None
        request = _requesting_fixture()
        if request is not None:
            request.addfinalizer(service.stop)  # at the end of the scope of the fixture that started it
        else:
            self._session.append(service)
        return service


class HostPorts:
    """``nsbox_host_ports.expose(PORT)``: the host's 127.0.0.1:PORT is 127.0.0.1:PORT inside every
    sandbox on the private network, for the rest of the session."""

    def __init__(self, registry: Callable[[], ServiceRegistry]) -> None:
        self._registry = registry

    def expose(self, port: int) -> None:
        """Until the end of the scope of the fixture that calls it (called from a test: of the session)."""
        if _in_sandbox:
            raise ServiceError("nsbox_host_ports.expose: call it from a fixture that runs in pytest's own process")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ServiceError(f"nsbox_host_ports.expose: expected a port number, got {port!r}")
        network = self._registry().network()
        try:
            network.expose_host_port(port)
        except NetworkError as exc:
            raise ServiceError(f"nsbox_host_ports.expose({port}): {exc}") from None
        request = _requesting_fixture()
        if request is not None:  # its server stops with that fixture: another process may take the port then

            def unexpose() -> None:
                try:
                    network.unexpose_host_port(port)
                except NetworkError:
                    pass  # N is gone: so are the sandboxes

            request.addfinalizer(unexpose)


class TestNetwork:
    """The current test's private network (``nsbox_network``)."""

    __test__ = False

    def __init__(self, control: socket.socket) -> None:
        self._control = control

    @property
    def services(self) -> dict[str, str]:
        """The services on the network when the test started: name -> address."""
        return dict(_services_seen)

    def _call(self, kind: str, **fields: Any) -> dict[str, Any]:
        from .box.network import call

        return call(self._control, {"kind": kind, **fields})

    def partition(self, name: str) -> None:
        """Cut service *name* off the network: its packets are dropped until heal()."""
        self._call("partition", name=name)

    def set_faults(
        self,
        name: str,
        *,
        delay: str | float | None = None,
        jitter: str | float | None = None,
        loss: str | float | None = None,
        rate: str | None = None,
    ) -> None:
        """What service *name* receives is delayed, lost or rate-limited (netem) until heal()."""
        network = Network(delay=delay, jitter=jitter, loss=loss, rate=rate)
        self._call("set_faults", name=name, faults=link_faults(network).to_wire())

    def heal(self) -> None:
        """Undo every partition and fault this test made (done at its end anyway)."""
        self._call("heal")


def network_for_test(nodeid: str) -> TestNetwork:
    if _control is None:
        raise ServiceError(NO_PRIVATE_NETWORK.format(nodeid=nodeid))
    return TestNetwork(_control)
