"""Network isolation: network="none" (the default) gives the test its own network namespace.

Inside, only the loopback interface exists (and it is up): anything outside the machine is
unreachable at once, with no timeout to wait for, while servers and clients on 127.0.0.1 work.
network="host" shares the host's network instead.
"""

from __future__ import annotations

import errno
import socket
import time

import pytest

import pytest_nsbox

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
