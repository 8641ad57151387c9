"""The run's private network: a bridge in a network namespace of its own, veths into sandboxes.

One network process (N) per pytest process (so xdist workers never share addresses or names),
started by P the first time a sandbox asks for ``network="private"``:

    N   joins the builder's user namespace (P owns it, so P's child may), where it is root and
        so has CAP_NET_ADMIN over every sandbox's network namespace (their user namespaces are
        the builder's children). Its main thread stays in P's network namespace (forwarded host
        ports are reached from there); one worker thread (``_Netns``) lives in a network
        namespace of its own with the bridge, and does every netlink operation (pyroute2) and
        creates every socket that must belong to the bridge's or a sandbox's namespace.

The builder's worker (W) asks N to connect each sandbox it built (``plumb``, with a pidfd of the
sandbox's PID 1): N creates a veth pair inside the sandbox's namespace (``eth0``, an address,
the default route) with its peer on the bridge, and applies the sandbox's link faults (netem, or
TBF for a rate alone). P asks N for the rest: probing a service's port, forwarding a service's
port to the host's loopback, exposing a host port inside sandboxes (a listener on the sandbox's
own 127.0.0.1:PORT), and a control connection for a test's ``nsbox_network`` fixture
(partition, heal, faults; undone when the test's connection closes).

Nothing of it lives in the host's network namespace: when N dies (with P: PR_SET_PDEATHSIG), the
bridge's namespace dies, and each sandbox's veth dies with the sandbox's namespace.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import select
import selectors
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeGuard, TypeVar

if TYPE_CHECKING:
    from concurrent.futures import Future  # N only: P and W never import it

from ..errors import NsboxError
from . import _linux as L
from .faults import inject

SUBNET: Final = ipaddress.IPv4Network("10.89.0.0/16")
GATEWAY: Final = str(SUBNET.network_address + 1)
BRIDGE: Final = "nsbox0"
SANDBOX_LINK: Final = "eth0"
MAX_MESSAGE: Final = 1 << 16
PROBE_TIMEOUT: Final = 0.25
LOOPBACK: Final = "127.0.0.1"
# what N's selector watches: requests from P, W, a test's nsbox_network; a sandbox's PID 1 exiting;
# a listener on a sandbox's loopback (to the host) or on the host's (to a service)
FROM_P, FROM_W, FROM_TEST, GONE, TO_HOST, TO_SERVICE = range(6)
BRIDGE_MAC: Final = "02:6e:73:62:6f:78"  # locally administered: "nsbox"
START_TIMEOUT: Final = 30.0  # P waits this long for N's first answer
USERNS_TIMEOUT: Final = 20.0  # N waits this long for the builder's user namespace (less: P hears why)
REQUEST_TIMEOUT: Final = 120.0  # a claim may wait for a sandbox's veth on a loaded machine
_SERVE: Final = "import sys; sys.path[:0] = sys.argv[1].split(chr(10)); from pytest_nsbox.box.network import serve; serve()"
NETEM_MISSING: Final = (
    "the kernel has no netem queueing discipline (sch_netem: CONFIG_NET_SCH_NETEM), which delay, jitter and loss need"
)
NETEM_FIX: Final = "load it as root (modprobe sch_netem) or use a kernel built with it; a rate alone works without it"

T = TypeVar("T")


class NetworkError(NsboxError):
    """The private network could not be set up or changed; the message says what and why."""


@dataclass(frozen=True, slots=True)
class LinkFaults:
    """Faults of one link, in the kernel's units (see spec.Network)."""

    delay_us: int = 0
    jitter_us: int = 0
    loss_percent: float = 0.0
    rate_bits: int | None = None

    @property
    def needs_netem(self) -> bool:
        return bool(self.delay_us or self.jitter_us or self.loss_percent)

    @property
    def empty(self) -> bool:
        return not self.needs_netem and self.rate_bits is None

    def to_wire(self) -> dict[str, Any]:
        return {
            "delay_us": self.delay_us,
            "jitter_us": self.jitter_us,
            "loss_percent": self.loss_percent,
            "rate_bits": self.rate_bits,
        }

    @classmethod
    def from_wire(cls, value: object) -> LinkFaults:
        """Faults as a message carries them, checked (a test's process may send anything)."""
        if not isinstance(value, dict) or set(value) != {"delay_us", "jitter_us", "loss_percent", "rate_bits"}:
            raise NetworkError(f"invalid faults {value!r}")
        delay, jitter, loss, rate = value["delay_us"], value["jitter_us"], value["loss_percent"], value["rate_bits"]
        if not all(_is_int(v) and 0 <= v <= MAX_DELAY_US for v in (delay, jitter)):
            raise NetworkError(f"invalid delay or jitter {value!r}")
        if not (_is_number(loss) and 0 <= loss <= 100):
            raise NetworkError(f"invalid loss {value!r}")
        if not (rate is None or (_is_int(rate) and MIN_RATE_BITS <= rate <= MAX_RATE_BITS)):
            raise NetworkError(f"invalid rate {value!r}")
        return cls(delay, jitter, float(loss), rate)


MAX_DELAY_US: Final = 60_000_000
MIN_RATE_BITS: Final = 8_000
MAX_RATE_BITS: Final = (2**32 - 1) * 8  # pyroute2 packs bytes per second into 32 bits


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class Plumbing:
    """What W asks N for one sandbox: its link's faults."""

    faults: LinkFaults = LinkFaults()


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None, flags: int = 0) -> None:
    socket.send_fds(sock, [json.dumps(message).encode()], fds or [], flags)


def _receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message (JSON: data only, whoever sent it) and its descriptors; (None, []) at EOF.
    NetworkError if it is not a JSON object (its descriptors are closed)."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 4)
    if not data:
        _close_all(fds)
        return None, []
    try:
        message = json.loads(data)
    except ValueError:
        message = None
    if not isinstance(message, dict) or not isinstance(message.get("kind", ""), str):
        _close_all(fds)
        raise NetworkError("a message that is not a JSON object")
    return message, fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def call(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
    """Send a request to N on *sock* and return its answer; NetworkError if N refused or is gone."""
    try:
        _send(sock, message, fds)
        answer, extra = _receive(sock)
    except TimeoutError:
        raise NetworkError(f"the private network's process did not answer {message.get('kind')!r} in time") from None
    except OSError as exc:
        raise NetworkError(f"the private network's process is gone: {exc}") from None
    _close_all(extra)
    if answer is None:
        raise NetworkError("the private network's process exited")
    if "error" in answer:
        raise NetworkError(str(answer["error"]))
    return answer


# --- P's side ------------------------------------------------------------------------------------


class NetworkHost:
    """P's handle on N: started once per pytest process, with the builder whose namespace it joins."""

    def __init__(self, builder_pid: int) -> None:
        import importlib.util
        import subprocess

        self._control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._for_builder, builder_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

        # a plain -I -S interpreter: this package's and pyroute2's parents (found, not imported: P never imports it)
        found = importlib.util.find_spec("pyroute2")
        paths = [str(Path(__file__).resolve().parents[2])]
        if found is not None and found.origin is not None:
            paths.append(str(Path(found.origin).resolve().parents[1]))
        try:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    _SERVE,
                    "\n".join(paths),
                    str(theirs.fileno()),
                    str(builder_theirs.fileno()),
                    str(builder_pid),
                    str(os.getpid()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(), builder_theirs.fileno()),
                close_fds=True,
            )
        except OSError as exc:
            self._control.close()
            self._for_builder.close()
            raise NetworkError(f"cannot start the private network's process ({sys.executable}): {exc}") from None
        finally:
            theirs.close()
            builder_theirs.close()
        self._control.settimeout(START_TIMEOUT)
        try:
            hello = call(self._control, {"kind": "hello"})
        except NetworkError:
            self.close()
            raise
        self.netem: bool = bool(hello["netem"])

    def builder_socket(self) -> int:
        """The descriptor W talks to N on (for the builder to send W once; see builder_socket_sent)."""
        return self._for_builder.fileno()

    def builder_socket_sent(self) -> None:
        """W has its copy: P's goes, so that N sees W's end when W ends."""
        self._for_builder.close()

    def request(self, what: str, fds: list[int] | None = None, **fields: Any) -> dict[str, Any]:
        """One request to N and its answer (NetworkError: refused, or N gone or stuck)."""
        self._control.settimeout(REQUEST_TIMEOUT)
        return call(self._control, {**fields, "kind": what}, fds)

    def probe(self, address: str, port: int) -> bool:
        """Whether *address*:*port* on the private network accepts a connection now."""
        return bool(self.request("probe", address=address, port=port)["open"])

    def forward_to_host(self, address: str, port: int) -> int:
        """A port of the host's 127.0.0.1 forwarded to *address*:*port* on the private network."""
        return int(self.request("forward_to_host", address=address, port=port)["port"])

    def expose_host_port(self, port: int) -> None:
        """The host's 127.0.0.1:*port*, reachable as 127.0.0.1:*port* inside every sandbox on the
        private network from now on (those built already get it when claimed)."""
        self.request("expose", port=port)

    def unexpose_host_port(self, port: int) -> None:
        """The host's port is no longer reachable from sandboxes."""
        self.request("unexpose", port=port)

    def claim(self, ticket: int, *, control: bool = False) -> tuple[str, socket.socket | None]:
        """The sandbox of builder *ticket*, about to run: its address once N has put it on the
        network (N works on it while the builder goes on; NetworkError if it could not). With
        *control*, also a connection for the test's nsbox_network fixture (what it changes is
        undone when the connection closes)."""
        ours: socket.socket | None = None
        fds: list[int] = []
        if control:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            fds.append(theirs.fileno())
        try:
            answer = self.request("claim", fds=fds, ticket=ticket)
        except BaseException:
            if ours is not None:
                ours.close()
            raise
        finally:
            if control:
                theirs.close()
        return str(answer["address"]), ours

    def register_service(self, name: str, address: str) -> None:
        self.request("service", name=name, address=address)

    def forget_service(self, name: str) -> None:
        self.request("forget", name=name)

    def close(self) -> None:
        self._control.close()
        self._for_builder.close()
        try:
            self._process.kill()
        except OSError:
            pass
        self._process.wait()


# --- W's side --------------------------------------------------------------------------------------


def plumb(sock: socket.socket, ticket: int, pidfd: int, plumbing: Plumbing) -> None:
    """W: have N put the sandbox of *ticket* (its PID 1: *pidfd*) on the network. N answers P's
    claim, not W: W goes on building while N works (if N is gone, the claim fails)."""
    try:
        _send(sock, {"kind": "plumb", "ticket": ticket, "faults": plumbing.faults.to_wire()}, [pidfd])
    except OSError:
        pass


# --- N ------------------------------------------------------------------------------------------


class _Netns:
    """N's worker thread in the bridge's network namespace: every netlink call, every socket
    of the bridge's or a sandbox's namespace is made there (setns(CLONE_NEWNET) is per thread)."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor  # N only

        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsbox-netns")
        self.home = self.run(self._enter)

    def run(self, action: Callable[[], T]) -> T:
        return self._executor.submit(action).result()

    def submit(self, action: Callable[[], T]) -> Future[T]:
        """Run *action* on the worker thread, after what is queued; its future."""
        return self._executor.submit(action)

    @staticmethod
    def _enter() -> int:
        L.unshare(L.CLONE_NEWNET)
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def inside(self, pidfd: int, action: Callable[[], T]) -> T:
        """Run *action* in the network namespace of the process *pidfd* (on the worker thread)."""

        def step() -> T:
            L.setns(pidfd, L.CLONE_NEWNET)
            try:
                return action()
            finally:
                L.setns(self.home, L.CLONE_NEWNET)

        return self.run(step)


@dataclass
class _Sandbox:
    pidfd: int
    address: str
    host_link: str
    faults: LinkFaults  # its own (Network(...)): what heal() restores
    connected: Future[None]  # its veth, on the worker thread: P's claim waits for it (only)
    listeners: dict[int, socket.socket] = field(default_factory=dict)  # exposed host port -> listener inside
    relays: list[socket.socket] = field(default_factory=list)  # its connections to host ports, shut when it dies


class _Server:
    """N's state: the bridge, the sandboxes on it, the services' names, the forwards."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute  # 150-300 ms: only N imports it

        self.netns = _Netns()
        self.bridge = self.netns.run(lambda: IPRoute(groups=0))  # a socket of the bridge's namespace, no events
        self.selector = selectors.DefaultSelector()
        self.sandboxes: dict[int, _Sandbox] = {}  # by pidfd
        self.services: dict[str, str] = {}  # name -> address
        self.forwards: dict[str, list[socket.socket]] = {}  # a service's address -> its listeners on the host
        self.exposed: set[int] = set()
        self._next_host = 2
        self._next_link = 0
        self.changed: dict[socket.socket, set[str]] = {}  # a test's connection -> names it partitioned or gave faults
        self.claims: dict[int, _Sandbox | str] = {}  # builder ticket -> its sandbox, or why it has none
        self.builder_side: socket.socket | None = None
        self.netem = False
        self.netns.run(self._make_bridge)

    # -- setup

    def _make_bridge(self) -> None:
        inject("N", "make_private_network")
        _no_ipv6_on_new_links()
        ipr = self.bridge
        ipr.link("set", index=_index(ipr, "lo"), state="up")
        try:
            # a fixed address: otherwise the bridge takes its lowest port's, which changes as veths
            # come and go, and the sandboxes' ARP entries for the gateway go stale
            ipr.link("add", ifname=BRIDGE, kind="bridge", address=BRIDGE_MAC)
        except Exception as exc:
            raise NetworkError(
                f"cannot create a bridge ({exc}): a kernel with CONFIG_BRIDGE (as root: modprobe bridge)"
            ) from None
        try:  # what every sandbox will need: fail here, once, naming it
            ipr.link("add", ifname="nsbprobe0", kind="veth", peer={"ifname": "nsbprobe1"})
            ipr.link("del", index=_index(ipr, "nsbprobe0"))
        except Exception as exc:
            raise NetworkError(f"cannot create a veth pair ({exc}): a kernel with CONFIG_VETH (as root: modprobe veth)") from None
        index = _index(ipr, BRIDGE)
        ipr.addr("add", index=index, address=GATEWAY, prefixlen=SUBNET.prefixlen)
        ipr.link("set", index=index, state="up")
        self.bridge_index = index
        # the gateway has nowhere to forward to: with forwarding on, it answers "network
        # unreachable" at once (off, it would drop the packets and a connect would time out)
        with open("/proc/sys/net/ipv4/ip_forward", "w") as handle:  # this thread's namespace: the bridge's
            handle.write("1")
        try:
            lo = _index(ipr, "lo")
            ipr.tc("add", "netem", index=lo, handle="1:", delay=1000)
            ipr.tc("del", index=lo, handle="1:", root=True)
            self.netem = True
        except Exception:
            self.netem = False

    def _allocate(self) -> str:
        used = {s.address for s in self.sandboxes.values()} | set(self.services.values())
        for _ in range(SUBNET.num_addresses):
            host = self._next_host
            self._next_host = host + 1 if host + 1 < SUBNET.num_addresses - 1 else 2
            address = str(SUBNET.network_address + host)
            if address not in used:
                return address
        raise NetworkError("the private network has no free address")

    # -- requests

    def plumb(self, ticket: int, pidfd: int, faults: LinkFaults) -> None:
        """Put the sandbox whose PID 1 is *pidfd* on the bridge (its result waits for P's claim)."""
        try:
            inject("N", "connect_network")
            if faults.needs_netem and not self.netem:
                raise NetworkError(NETEM_MISSING)
            address = self._allocate()
        except Exception as exc:
            os.close(pidfd)
            self.claims[ticket] = _describe(exc)
            return
        self._next_link += 1
        host_link = f"nsb{self._next_link}"  # unique: a dead sandbox's veth goes away asynchronously
        # on the worker thread, while this one answers P: a claim waits for its own sandbox only
        connected = self.netns.submit(lambda: self._connect(pidfd, host_link, address, faults))
        sandbox = _Sandbox(pidfd, address, host_link, faults, connected)
        self.sandboxes[pidfd] = sandbox
        self.claims[ticket] = sandbox
        self.selector.register(pidfd, selectors.EVENT_READ, (GONE, sandbox))

    def _connect(self, pidfd: int, host_link: str, address: str, faults: LinkFaults) -> None:
        """On the worker thread: a veth pair made from the bridge's side (pyroute2; its end enslaved
        and up) with ``eth0`` in the sandbox's namespace, which then gets an address, is brought up
        and gets the default route. Those three go through the small netlink and ioctl helpers every
        sandbox's loopback is configured with: a pyroute2 IPRoute in a fresh namespace costs ~2 ms,
        the whole budget of a test on the private network."""
        L.setns(pidfd, L.CLONE_NEWNET)
        try:
            sandbox_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            _no_ipv6_on_new_links()
        finally:
            L.setns(self.netns.home, L.CLONE_NEWNET)
        try:
            self.bridge.link(
                "add",
                ifname=host_link,
                kind="veth",
                master=self.bridge_index,
                state="up",
                peer={"ifname": SANDBOX_LINK, "net_ns_fd": sandbox_ns},
            )
            L.setns(sandbox_ns, L.CLONE_NEWNET)
            try:
                L.set_interface_up(SANDBOX_LINK)
                L.add_address(SANDBOX_LINK, socket.AF_INET, address, SUBNET.prefixlen)
                L.add_default_route(socket.AF_INET, GATEWAY)
            finally:
                L.setns(self.netns.home, L.CLONE_NEWNET)
            if not faults.empty:
                self._apply_faults(_index(self.bridge, host_link), faults)
        finally:
            os.close(sandbox_ns)

    def claim(self, ticket: int) -> _Sandbox:
        """The sandbox of *ticket* as plumbed, with the exposed host ports (NetworkError)."""
        self.end_finished_tests()  # what the test before changed is undone before this one starts
        self.drain_builder()  # W sent its plumb request before P heard the sandbox was ready
        result = self.claims.pop(ticket, None)
        if result is None:
            raise NetworkError(f"the sandbox (ticket {ticket}) was never put on the private network")
        if isinstance(result, str):
            raise NetworkError(result)
        try:
            result.connected.result()
        except Exception as exc:
            raise NetworkError(_describe(exc)) from None
        self.attach(result)
        return result

    def _apply_faults(self, index: int, faults: LinkFaults) -> None:
        """On the host side of a link: what the sandbox receives is delayed, lost, rate-limited."""
        if faults.needs_netem and not self.netem:
            raise NetworkError(NETEM_MISSING)  # before anything changes
        ipr = self.bridge
        try:
            ipr.tc("del", index=index, handle="1:", root=True)
        except Exception:
            pass  # no qdisc of ours yet
        if faults.empty:
            return
        if faults.needs_netem:
            options: dict[str, Any] = {"delay": faults.delay_us, "jitter": faults.jitter_us, "loss": faults.loss_percent}
            if faults.rate_bits is not None:
                options["rate"] = faults.rate_bits // 8
            ipr.tc("add", "netem", index=index, handle="1:", **options)
        else:
            assert faults.rate_bits is not None
            rate = faults.rate_bits // 8
            burst = max(2 * 1514, rate // 100)  # a 10 ms bucket, at least two full frames
            ipr.tc("add", "tbf", index=index, handle="1:", rate=rate, burst=burst, latency=100000)

    def _service(self, name: object) -> tuple[_Sandbox, int]:
        """The sandbox of service *name* and its link's index on the bridge."""
        address = self.services.get(name) if isinstance(name, str) else None
        if address is None:
            known = ", ".join(sorted(self.services)) or "none"
            raise NetworkError(f"no service named {name!r} on the private network (services: {known})")
        sandbox = next((s for s in self.sandboxes.values() if s.address == address), None)
        if sandbox is None:
            raise NetworkError(f"service {name!r} is not running")
        try:
            return sandbox, self.netns.run(lambda: _index(self.bridge, sandbox.host_link))  # pyroute2: its thread
        except Exception:
            raise NetworkError(f"service {name!r} has no link on the private network") from None

    def partition(self, name: object) -> None:
        _, index = self._service(name)
        self.netns.run(lambda: self.bridge.link("set", index=index, master=0))

    def set_faults(self, name: object, faults: LinkFaults) -> None:
        _, index = self._service(name)
        self.netns.run(lambda: self._apply_faults(index, faults))

    def heal(self, names: set[str]) -> None:
        """Every link of *names* back on the bridge, with its own faults only."""
        for name in names:
            try:
                sandbox, index = self._service(name)

                def restore(index: int = index, faults: LinkFaults = sandbox.faults) -> None:
                    self.bridge.link("set", index=index, master=self.bridge_index, state="up")
                    self._apply_faults(index, faults)

                self.netns.run(restore)
            except Exception:
                continue  # stopped meanwhile: its link went with it

    def probe(self, address: str, port: int) -> bool:
        probe = self.netns.run(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        with probe:
            probe.settimeout(PROBE_TIMEOUT)
            try:
                probe.connect((address, port))
            except OSError:
                return False
        return True

    def forward_to_host(self, address: str, port: int) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # the host's namespace: N's main thread
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, 0))
        listener.listen(64)
        self.selector.register(listener, selectors.EVENT_READ, (TO_SERVICE, (address, port)))
        self.forwards.setdefault(address, []).append(listener)
        return int(listener.getsockname()[1])

    def forget(self, name: str) -> None:
        """A service stopped: its name and its forwards go."""
        address = self.services.pop(name, None)
        for listener in self.forwards.pop(address or "", []):
            self.selector.unregister(listener)
            listener.close()

    def expose(self, port: int) -> None:
        self.exposed.add(port)

    def unexpose(self, port: int) -> None:
        """The host port is no longer reachable from sandboxes (its server stopped)."""
        self.exposed.discard(port)
        for sandbox in self.sandboxes.values():
            listener = sandbox.listeners.pop(port, None)
            if listener is not None:
                self.selector.unregister(listener)
                listener.close()

    def attach(self, sandbox: _Sandbox) -> None:
        """Listeners on the sandbox's loopback for the host ports it lacks."""
        missing = sorted(self.exposed - set(sandbox.listeners))
        if not missing:
            return
        made: list[socket.socket] = []

        def listen() -> None:
            for port in missing:
                made.append(_listen_loopback(port))

        try:
            self.netns.inside(sandbox.pidfd, listen)
        except BaseException:
            for listener in made:
                listener.close()  # a socket holds its namespace: never keep one half made
            raise
        for port, listener in zip(missing, made, strict=True):
            sandbox.listeners[port] = listener
            self.selector.register(listener, selectors.EVENT_READ, (TO_HOST, (sandbox, port)))

    # -- events

    def drain_builder(self) -> None:
        """Handle every plumb request W has sent so far."""
        while self.builder_side is not None and select.select([self.builder_side], [], [], 0)[0]:
            try:  # (socket.recv_fds ignores its flags before Python 3.12: no MSG_DONTWAIT)
                request, fds = _receive(self.builder_side)
            except (OSError, NetworkError):
                request, fds = None, []
            if request is None:
                self.selector.unregister(self.builder_side)
                self.builder_side.close()
                self.builder_side = None
                return
            self.handle_builder(request, fds)

    def handle_builder(self, request: dict[str, Any], fds: list[int]) -> None:
        ticket = request.get("ticket")
        try:
            if request.get("kind") != "plumb" or len(fds) != 1 or not _is_int(ticket):
                raise NetworkError(f"unexpected request from the builder: {request!r}")
            faults = LinkFaults.from_wire(request.get("faults"))
        except NetworkError as exc:
            _close_all(fds)
            if _is_int(ticket):
                self.claims[ticket] = str(exc)
            return
        self.plumb(ticket, fds[0], faults)

    def end_finished_tests(self) -> None:
        """Undo what tests whose connections closed changed (before the next test is claimed)."""
        for sock in select.select(list(self.changed), [], [], 0)[0] if self.changed else []:
            while sock in self.changed and select.select([sock], [], [], 0)[0]:
                _answer(self, sock, FROM_TEST)

    def accept_to_host(self, sandbox: _Sandbox, port: int) -> None:
        listener = sandbox.listeners.get(port)
        if listener is None:
            return
        try:
            inside, _ = listener.accept()
        except OSError:
            return
        outside = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # N's main thread: the host's namespace
        sandbox.relays += [inside, outside]
        _relay(inside, outside, (LOOPBACK, port))

    def accept_to_service(self, listener: socket.socket, target: tuple[str, int]) -> None:
        try:
            outside, _ = listener.accept()
        except OSError:
            return
        inside = self.netns.run(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        _relay(outside, inside, target)

    def sandbox_gone(self, sandbox: _Sandbox) -> None:
        self.selector.unregister(sandbox.pidfd)
        for listener in sandbox.listeners.values():
            self.selector.unregister(listener)
            listener.close()  # a socket holds its namespace: the sandbox's must be able to die
        for relay in sandbox.relays:
            try:
                relay.shutdown(socket.SHUT_RDWR)  # its relay threads end and close it
            except OSError:
                pass
        del self.sandboxes[sandbox.pidfd]
        for ticket in [t for t, claimed in self.claims.items() if claimed is sandbox]:
            del self.claims[ticket]  # discarded before its test ran
        sandbox.connected.cancel()
        pidfd = sandbox.pidfd

        def close_pidfd(_: Future[None]) -> None:
            os.close(pidfd)

        # closed once the worker thread is done with it (at once if it is, or never started)
        sandbox.connected.add_done_callback(close_pidfd)


def _no_ipv6_on_new_links() -> None:
    """In the calling thread's network namespace: links made from now on get no IPv6 (the private
    network is IPv4; link-local addresses and their duplicate detection are per-test kernel work
    for nothing). Loopback keeps its addresses."""
    try:
        with open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as handle:
            handle.write("1")
    except FileNotFoundError:
        pass  # a kernel without IPv6


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, NetworkError | OSError) else f"{type(exc).__name__}: {exc}"


def _index(ipr: Any, name: str) -> int:
    """A link's index, asked by name (not a dump of every link)."""
    return int(ipr.link("get", ifname=name)[0]["index"])


def _listen_loopback(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, port))
    listener.listen(64)
    return listener


def _relay(accepted: socket.socket, upstream: socket.socket, target: tuple[str, int]) -> None:
    """Connect *upstream* to *target* and copy bytes both ways, on two threads of N's."""

    def copy(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def run() -> None:
        try:
            upstream.connect(target)
        except OSError:
            accepted.close()  # the client sees its connection closed, as with nothing listening
            upstream.close()
            return
        back = threading.Thread(target=copy, args=(upstream, accepted), daemon=True)
        back.start()
        copy(accepted, upstream)
        back.join()
        accepted.close()
        upstream.close()

    threading.Thread(target=run, daemon=True).start()


def serve() -> None:
    """Main of N (argv: import paths, P's socket, W's socket, the builder's pid, P's pid)."""
    control = socket.socket(fileno=int(sys.argv[2]))
    builder_side = socket.socket(fileno=int(sys.argv[3]))
    builder_pid, parent = int(sys.argv[4]), int(sys.argv[5])
    L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # P handles ^C
    step = "join_builder_user_namespace"
    try:
        userns = _builder_user_namespace(builder_pid)
        L.setns(userns, L.CLONE_NEWUSER)  # root there: CAP_NET_ADMIN over every sandbox's namespace
        os.close(userns)
        step = "make_private_network"
        server = _Server()
    except Exception as exc:
        try:
            _receive(control)
            _send(control, {"error": f"cannot set up the private network: step {step}: {_describe(exc)}"})
        except (OSError, NetworkError):
            pass
        return
    server.selector.register(control, selectors.EVENT_READ, (FROM_P, None))
    server.selector.register(builder_side, selectors.EVENT_READ, (FROM_W, None))
    server.builder_side = builder_side
    while True:
        events = server.selector.select()
        events.sort(key=lambda event: event[0].data[0] != FROM_P)  # P waits: its requests first
        for key, _ in events:
            kind, data = key.data
            try:
                if kind == FROM_W:
                    server.drain_builder()
                elif kind == FROM_P:
                    if not _answer(server, key.fileobj, kind):  # type: ignore[arg-type]
                        return  # P is gone
                elif kind == FROM_TEST:
                    if key.fileobj in server.changed:  # not ended already (end_finished_tests)
                        _answer(server, key.fileobj, kind)  # type: ignore[arg-type]
                elif kind == GONE:
                    server.sandbox_gone(data)
                elif kind == TO_HOST:
                    server.accept_to_host(*data)
                elif kind == TO_SERVICE:
                    server.accept_to_service(key.fileobj, data)  # type: ignore[arg-type]
            except Exception as exc:  # one event's failure (EMFILE, a vanished link) never ends N
                print(f"pytest-nsbox network process: {_describe(exc)}", file=sys.stderr)


def _builder_user_namespace(builder_pid: int, timeout: float = USERNS_TIMEOUT) -> int:
    """A descriptor of the builder's user namespace, once the builder has entered it and mapped
    its ids (a builder just started may still be in P's)."""
    import time

    own = os.stat("/proc/self/ns/user").st_ino
    deadline = time.monotonic() + timeout
    while True:
        userns = os.open(f"/proc/{builder_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        if os.fstat(userns).st_ino != own and Path(f"/proc/{builder_pid}/uid_map").read_text().strip():
            return userns
        os.close(userns)
        if time.monotonic() > deadline:
            raise NetworkError(f"the sandbox builder (pid {builder_pid}) did not enter its user namespace")
        time.sleep(0.005)


def _answer(server: _Server, sock: socket.socket, kind: int) -> bool:
    """Answer one request on *sock*; False when its sender is gone (or, a test, misbehaved)."""
    try:
        request, fds = _receive(sock)
    except (OSError, NetworkError):
        request, fds = None, []  # a test's garbage ends its connection, never N
    if request is None:
        _drop(server, sock, kind)
        return False
    if kind == FROM_TEST:
        _close_all(fds)  # a test sends no descriptors: none may pile up in N
        fds = []
    try:
        answer = _dispatch(server, sock, kind, request, fds)
    except Exception as exc:
        _close_all(fds)
        answer = {"error": _describe(exc)}
    try:
        # a test that sends and never reads must not stall N: its connection ends instead
        _send(sock, answer, flags=socket.MSG_DONTWAIT if kind == FROM_TEST else 0)
    except OSError:
        if kind == FROM_TEST:
            _drop(server, sock, kind)
            return False
    return True


def _drop(server: _Server, sock: socket.socket, kind: int) -> None:
    """The connection ended: what a test changed is undone."""
    try:
        server.selector.unregister(sock)
    except KeyError:
        pass
    if kind == FROM_TEST:
        server.heal(server.changed.pop(sock, set()))
    sock.close()


def _dispatch(server: _Server, sock: socket.socket, kind: int, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    what = request.get("kind")
    if kind == FROM_TEST:  # a test's nsbox_network: only what changes the services' links, undone at its end
        names = server.changed.setdefault(sock, set())
        name = request.get("name")
        if what == "partition":
            server.partition(name)
            names.add(str(name))
        elif what == "set_faults":
            server.set_faults(name, LinkFaults.from_wire(request.get("faults")))
            names.add(str(name))
        elif what == "heal":
            server.heal(names)
            names.clear()
        elif what == "services":
            return {"services": dict(server.services)}
        else:
            raise NetworkError(f"unknown request {what!r}")
        return {}
    if what == "hello":
        return {"netem": server.netem}
    if what == "probe":
        return {"open": server.probe(request["address"], int(request["port"]))}
    if what == "forward_to_host":
        return {"port": server.forward_to_host(request["address"], int(request["port"]))}
    if what == "expose":
        server.expose(int(request["port"]))
        return {}
    if what == "unexpose":
        server.unexpose(int(request["port"]))
        return {}
    if what == "claim":
        control = socket.socket(fileno=fds.pop()) if fds else None
        try:
            sandbox = server.claim(int(request["ticket"]))
        except BaseException:
            if control is not None:
                control.close()
            raise
        if control is not None:
            server.changed[control] = set()
            server.selector.register(control, selectors.EVENT_READ, (FROM_TEST, None))
        return {"address": sandbox.address}
    if what == "service":
        server.services[request["name"]] = request["address"]
        return {}
    if what == "forget":
        server.forget(request["name"])
        return {}
    raise NetworkError(f"unknown request {what!r}")
