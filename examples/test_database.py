"""A real database in a sandbox of its own, on the run's private network.

The ``db`` fixture starts Debian's redis-server (recipe ``debian-bookworm-redis``: a ``run`` step
installs it) as a service: its own namespaces, a throwaway overlay of the image, a memory limit,
an address on the private network. Tests marked ``network="private"`` reach it by name (``db``)
and nothing else; ``nsbox_network`` cuts it off and heals it; ``db.host_port`` forwards its port to
the host's loopback for code that is not sandboxed. When the module ends, the service is stopped
and everything it wrote is gone.
"""

from __future__ import annotations

import socket

import pytest

from pytest_nsbox import nsbox
from pytest_nsbox.services import Service

REDIS = ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]


@pytest.fixture(scope="module")
def db(nsbox_service) -> Service:
    return nsbox_service("db", image="debian-bookworm-redis", command=REDIS, ready_port=6379, memory="128M")


def redis(host: str, port: int, *command: str, timeout: float = 5) -> bytes:
    """Send one command in redis's protocol (RESP) and return its reply (a line, or a bulk string)."""
    request = f"*{len(command)}\r\n" + "".join(f"${len(arg.encode())}\r\n{arg}\r\n" for arg in command)
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(request.encode())
        reply = connection.makefile("rb")
        line = reply.readline()
        if line.startswith(b"$") and not line.startswith(b"$-1"):
            line += reply.read(int(line[1:]) + 2)  # the bulk string and its CRLF
        return line


@nsbox(network="private")
def test_set_and_get_by_name(db: Service) -> None:
    assert redis("db", 6379, "SET", "greeting", "hello") == b"+OK\r\n"
    assert redis("db", 6379, "GET", "greeting") == b"$5\r\nhello\r\n"


@nsbox(network="private")
def test_the_next_test_talks_to_the_same_server(db: Service) -> None:
    assert redis("db", 6379, "GET", "greeting") == b"$5\r\nhello\r\n"  # the service lives for the module


@nsbox(network="private")
def test_a_partitioned_database_times_out_until_healed(db: Service, nsbox_network) -> None:
    nsbox_network.partition("db")
    with pytest.raises(OSError):
        redis("db", 6379, "PING", timeout=1)
    nsbox_network.heal()
    assert redis("db", 6379, "PING") == b"+PONG\r\n"


@nsbox(network="none")
def test_network_none_cannot_see_it(db: Service) -> None:
    with pytest.raises(OSError):
        socket.getaddrinfo("db", 6379)


def test_unsandboxed_code_uses_a_forwarded_port(db: Service) -> None:
    assert redis("127.0.0.1", db.host_port(6379), "PING") == b"+PONG\r\n"
    assert "Ready to accept connections" in db.logs()
