"""Network isolation: network="none" (the default) gives the test its own network namespace.

Inside, only the loopback interface exists (and it is up): anything outside the machine is
unreachable at once, with no timeout to wait for, while servers and clients on 127.0.0.1 work.
network="host" shares the host's network instead. network="private" puts the test on the run's
private network, where a server that a wider fixture runs in pytest's own process is reachable
at the same address once exposed (nsbox_host_ports); services are in test_database.py.
"""

from __future__ import annotations

import errno
import http.server
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

import pytest_nsbox
import pytest_nsbox.services

TEST_NET = ("192.0.2.1", 9)  # TEST-NET-1 (RFC 5737): documentation only, never routable


@pytest_nsbox.nsbox(network="none")
def test_only_loopback_exists() -> None:
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
    with open("/proc/net/dev") as handle:
        devices = [line.split(":")[0].strip() for line in handle.readlines()[2:]]
    assert devices == ["lo"]


@pytest_nsbox.nsbox(network="none")
def test_the_outside_is_unreachable_immediately() -> None:
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        with pytest.raises(OSError) as excinfo:
            sock.connect(TEST_NET)
    assert excinfo.value.errno == errno.ENETUNREACH  # no route: there is nothing but lo
    assert time.monotonic() - start < 1


@pytest_nsbox.nsbox(network="none")
def test_loopback_server_and_client() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:  # port 0: any free port
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"


@pytest_nsbox.nsbox(network="none")
def test_hostname() -> None:
    assert socket.gethostname() == "nsbox"


@pytest_nsbox.nsbox(network="host")
def test_network_host_shares_the_hosts_interfaces(host_interfaces: list[str]) -> None:
    # host_interfaces is session-scoped, so conftest.py read it on the host, outside any sandbox.
    assert sorted(name for _, name in socket.if_nameindex()) == host_interfaces


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # whatever http_proxy says


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from pytest's own process"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def live_server(nsbox_host_ports: pytest_nsbox.services.HostPorts) -> Iterator[str]:
    """An HTTP server in pytest's process (the live_server pattern), exposed to private sandboxes."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    nsbox_host_ports.expose(server.server_address[1])
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest_nsbox.nsbox(network="private")
def test_a_private_sandbox_reaches_an_exposed_host_port(live_server: str) -> None:
    with NO_PROXY.open(live_server, timeout=5) as response:  # the same URL as outside
        assert response.read() == b"hello from pytest's own process"


@pytest_nsbox.nsbox(network="none")
def test_network_none_does_not(live_server: str) -> None:
    with pytest.raises(OSError):
        NO_PROXY.open(live_server, timeout=5)
