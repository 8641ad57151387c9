"""network="private": the run's own bridge, services on it (nsbox_service), host ports into it
(nsbox_host_ports), and a test's view of it (nsbox_network: partition, heal, faults)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from pytest_nsbox import probe

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns, pytest.mark.needs_private_network]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # the short summary lines whole


# An echo server as a service command: answers each connection with "echo:" + what it got.
ECHO_SERVER = '''
import sys
ECHO = [sys.executable, "-c", """
import socket, sys, threading
port = int(sys.argv[1]) if len(sys.argv) > 1 else 7000
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen()
print("listening on", port, flush=True)

def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with c:
        while data := c.recv(65536):
            c.sendall(b"echo:" + data)

while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""]

def ask(host, port, data=b"hi", timeout=5):
    import socket
    with socket.create_connection((host, port), timeout=timeout) as c:
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := c.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)
'''


def test_a_private_test_reaches_a_service_by_name_and_nothing_else(run_inner) -> None:
    result = run_inner(
        ECHO_SERVER
        + """
import errno, socket
import pytest
from pytest_nsbox import nsbox

@pytest.fixture(scope="module")
def echo(nsbox_service):
    return nsbox_service("echo", command=ECHO, ready_port=7000)

@nsbox(network="private")
def test_by_name(echo):
    assert ask("echo", 7000) == b"echo:hi"
    assert socket.gethostbyname("echo") == echo.ip
    hosts = open("/etc/hosts").read()
    assert f"{echo.ip}\\techo" in hosts
    names = sorted(name for _, name in socket.if_nameindex())
    assert names == ["eth0", "lo"]

@nsbox(network="private")
def test_only_the_private_network(echo):
    with pytest.raises(OSError) as caught:
        socket.create_connection(("192.0.2.1", 9), timeout=3)  # TEST-NET-1: outside the private network
    assert caught.value.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)

@nsbox(network="none")
def test_network_none_has_no_service(echo):
    with pytest.raises(OSError):
        socket.getaddrinfo("echo", 7000)

def test_from_the_host_through_a_forwarded_port(echo):
    assert ask("127.0.0.1", echo.host_port(7000)) == b"echo:hi"
    assert "listening on 7000" in echo.logs()
"""
    )
    result.assert_outcomes(passed=4)


def test_a_service_stops_at_the_end_of_its_fixtures_scope(run_inner) -> None:
    result = run_inner(
        ECHO_SERVER
        + """
import os, pytest
from pytest_nsbox import nsbox

seen = {}

class TestWithIt:
    @pytest.fixture(scope="class")
    def echo(self, nsbox_service):
        service = nsbox_service("echo", command=ECHO, ready_port=7000)
        seen["pid"] = service.pid
        return service

    @nsbox(network="private")
    def test_uses_it(self, echo):
        assert ask("echo", 7000) == b"echo:hi"

def test_gone_after_the_class():
    import helpers
    assert seen["pid"] not in [p.pid for p in helpers.processes()]
    assert not [p for p in helpers.processes() if p.ppid == os.getpid() and b"import socket, sys" in b" ".join(p.argv)]
""",
        "-p",
        "no:randomly",
    )
    result.assert_outcomes(passed=2)


def test_a_failed_test_shows_the_logs_of_its_services(run_inner) -> None:
    result = run_inner(
        ECHO_SERVER
        + """
import pytest
from pytest_nsbox import nsbox

@pytest.fixture(scope="module")
def echo(nsbox_service):
    return nsbox_service("echo", command=ECHO, ready_port=7000)

@nsbox(network="private")
def test_fails(echo):
    assert ask("echo", 7000) == b"nope"
"""
    )
    result.assert_outcomes(failed=1)
    assert re.search(r"-+ nsbox: service echo log -+\s+listening on 7000", result.stdout.str())


def test_a_service_that_is_never_ready_is_an_error_naming_it_with_its_log(run_inner) -> None:
    result = run_inner(
        """
import sys
import pytest
from pytest_nsbox import nsbox

@pytest.fixture(scope="module")
def slow(nsbox_service):
    return nsbox_service("slow", command=[sys.executable, "-c", "print('warming up', flush=True); import time; time.sleep(60)"],
                         ready_port=5432, ready_timeout=2)

@pytest.fixture(scope="module")
def dies(nsbox_service):
    return nsbox_service("dies", command=[sys.executable, "-c", "print('bad config', flush=True); raise SystemExit(3)"],
                         ready_port=5432)

@pytest.fixture(scope="module")
def missing(nsbox_service):
    return nsbox_service("missing", command=["/nonexistent/server"], ready_port=5432)

@nsbox(network="private")
def test_slow(slow):
    pass

@nsbox(network="private")
def test_dies(dies):
    pass

@nsbox(network="private")
def test_missing(missing):
    pass
"""
    )
    result.assert_outcomes(errors=3)
    out = result.stdout.str()
    assert "nsbox_service 'slow': not ready within 2s (waiting for port 5432); last lines of its log:" in out
    assert "warming up" in out
    assert "nsbox_service 'dies': exited before it was ready; last lines of its log:" in out
    assert "bad config" in out
    assert "cannot run '/nonexistent/server' in service 'missing'" in out


def test_bad_service_arguments_are_errors_naming_the_value(run_inner) -> None:
    result = run_inner(
        ECHO_SERVER
        + """
import pytest
from pytest_nsbox import nsbox

@pytest.mark.parametrize("kwargs", [
    {"name": "localhost", "command": ["x"]},
    {"name": "ok", "command": ["x"], "env": {"A": 1}},
    {"name": "ok", "command": ["x"], "ready_port": 70000},
    {"name": "ok", "command": ["x"], "ready_log": "("},
    {"name": "Bad_Name", "command": ["x"]},
    {"name": "ok", "command": "a string"},
    {"name": "ok", "command": ["x"], "memory": "lots"},
    {"name": "ok", "command": ["x"], "network": "host"},
    {"name": "ok", "command": ["x"], "colour": "red"},
])
def test_bad(nsbox_service, kwargs):
    from pytest_nsbox.services import ServiceError
    with pytest.raises(ServiceError) as caught:
        nsbox_service(kwargs.pop("name"), **kwargs)
    print("ERROR:", caught.value)

@pytest.fixture
def inside(nsbox_service):
    return nsbox_service("inside", command=ECHO, ready_port=7000)

@nsbox(network="private")
def test_not_from_inside_a_sandbox(inside):
    pass
""",
        "-s",
    )
    result.assert_outcomes(passed=9, errors=1)
    out = result.stdout.str()
    assert "'localhost' names the sandbox itself" in out
    assert "env must map strings to strings" in out
    assert "ready_port must be a port number, got 70000" in out
    assert "ready_log '(' is not a regular expression" in out
    assert "invalid name 'Bad_Name'" in out
    assert "command must be a non-empty list of strings, got 'a string'" in out
    assert "invalid memory 'lots'" in out
    assert "not network='host'" in out
    assert "unexpected argument 'colour'" in out
    assert "'inside' cannot be started inside a sandboxed test" in out


def test_a_host_port_exposed_by_a_wider_fixture_is_reachable_inside(run_inner) -> None:
    result = run_inner(
        """
import socket, socketserver, threading
import pytest
from pytest_nsbox import nsbox

class Hello(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"hello from pytest's process")

@pytest.fixture(scope="session")
def live_server(nsbox_host_ports):
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    nsbox_host_ports.expose(server.server_address[1])
    yield server.server_address[1]
    server.shutdown()

@pytest.fixture(scope="session")
def hidden_server():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()

def receive(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        return c.recv(100)

@nsbox(network="private")
def test_exposed(live_server):
    assert receive(live_server) == b"hello from pytest's process"

@nsbox(network="private")
def test_exposed_again(live_server):
    assert receive(live_server) == b"hello from pytest's process"

@nsbox(network="private")
def test_not_exposed(hidden_server):
    with pytest.raises(ConnectionRefusedError):
        receive(hidden_server)
"""
    )
    result.assert_outcomes(passed=3)


def test_partition_and_heal_and_undone_at_the_end(run_inner) -> None:
    result = run_inner(
        ECHO_SERVER
        + """
import socket
import pytest
from pytest_nsbox import nsbox

@pytest.fixture(scope="module")
def echo(nsbox_service):
    return nsbox_service("echo", command=ECHO, ready_port=7000)

@nsbox(network="private")
def test_partition_then_heal(echo, nsbox_network):
    assert nsbox_network.services == {"echo": echo.ip}
    nsbox_network.partition("echo")
    with pytest.raises(OSError):
        ask("echo", 7000, timeout=1)
    nsbox_network.heal()
    assert ask("echo", 7000) == b"echo:hi"

@nsbox(network="private")
def test_partition_left_in_place(echo, nsbox_network):
    nsbox_network.partition("echo")

@nsbox(network="private")
def test_next_test_sees_it_healed(echo):
    assert ask("echo", 7000) == b"echo:hi"

@nsbox(network="private")
def test_unknown_service(echo, nsbox_network):
    from pytest_nsbox.box.network import NetworkError
    with pytest.raises(NetworkError, match="no service named 'db' on the private network \\\\(services: echo\\\\)"):
        nsbox_network.partition("db")

@nsbox(network="none")
def test_not_on_a_private_network(nsbox_network):
    pass
""",
        "-p",
        "no:randomly",
    )
    result.assert_outcomes(passed=4, errors=1)
    assert "is not on a private network: mark it with network='private'" in result.stdout.str()


def test_a_rate_limit_slows_what_the_test_receives(run_inner) -> None:
    result = run_inner(
        '''
import socket, sys, time
import pytest
from pytest_nsbox import Network, nsbox

# a service that sends 60 kB to each connection, then closes it
SOURCE = [sys.executable, "-c", """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7001)); s.listen()
while True:
    c, _ = s.accept()
    with c:
        try:
            c.sendall(b"x" * 60000)
        except OSError:  # the readiness probe connects and closes at once
            pass
"""]

@pytest.fixture(scope="module")
def source(nsbox_service):
    return nsbox_service("source", command=SOURCE, ready_port=7001)

def download():
    start = time.monotonic()
    with socket.create_connection(("source", 7001), timeout=30) as c:
        received = 0
        while chunk := c.recv(65536):
            received += len(chunk)
    assert received == 60000
    return time.monotonic() - start

@nsbox(network=Network(rate="200kbit"))
def test_limited(source):
    elapsed = download()
    print("limited", elapsed)
    assert elapsed >= 1.5  # 60 kB at 25 kB/s: 2.4 s on the wire, minus the bucket's burst

@nsbox(network="private")
def test_unlimited(source):
    elapsed = download()
    print("unlimited", elapsed)
    assert elapsed < 1.5
''',
        "-s",
    )
    result.assert_outcomes(passed=2)


@pytest.mark.needs_netem
def test_delay_loss_and_faults_mid_test(run_inner) -> None:
    result = run_inner(
        ECHO_SERVER
        + """
import socket, time
import pytest
from pytest_nsbox import Network, nsbox

@pytest.fixture(scope="module")
def echo(nsbox_service):
    return nsbox_service("echo", command=ECHO, ready_port=7000)

def round_trip(connection):
    start = time.monotonic()
    connection.sendall(b"x")
    assert connection.recv(100) == b"echo:x"
    return time.monotonic() - start

def connect():
    connection = socket.create_connection(("echo", 7000), timeout=5)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection

@nsbox(network=Network(delay="100ms"))
def test_delay(echo):
    with connect() as connection:
        round_trip(connection)  # the first one learns the neighbour (ARP): once
        times = [round_trip(connection) for _ in range(5)]
    print("delayed round trips", " ".join(f"{t * 1000:.1f}ms" for t in times))
    # the reply is delayed on its way to the test: one delay per round trip, and little else
    assert all(0.1 <= t <= 0.1 + 0.05 for t in times)

@nsbox(network="private")
def test_no_delay(echo):
    with connect() as connection:
        round_trip(connection)
        times = [round_trip(connection) for _ in range(5)]
    print("plain round trips", " ".join(f"{t * 1000:.1f}ms" for t in times))
    assert all(t < 0.05 for t in times)

@nsbox(network=Network(loss="100%"))
def test_total_loss(echo):
    with pytest.raises(OSError):
        ask("echo", 7000, timeout=1.5)

@nsbox(network="private")
def test_faults_mid_test_then_heal(echo, nsbox_network):
    nsbox_network.set_faults("echo", delay="100ms")
    with connect() as connection:  # what the service receives is delayed: the request
        round_trip(connection)
        assert 0.1 <= round_trip(connection) <= 0.1 + 0.05
    nsbox_network.set_faults("echo", loss="100%")
    with pytest.raises(OSError):
        ask("echo", 7000, timeout=1.5)
    nsbox_network.heal()
    assert ask("echo", 7000) == b"echo:hi"
""",
        "-s",
    )
    result.assert_outcomes(passed=4)
    print(*(line for line in result.outlines if "round trips" in line), sep="\n")


def test_faults_where_netem_is_missing_are_skipped_naming_it(run_inner) -> None:
    if probe.netem().ok:
        pytest.skip("this kernel has netem")
    source = """
from pytest_nsbox import Network, nsbox

@nsbox(network=Network(delay="100ms"))
def test_delay():
    raise AssertionError("must not run")

@nsbox(network=Network(rate="1mbit"))
def test_rate_alone_runs():
    pass
"""
    result = run_inner(source)
    result.assert_outcomes(passed=1, skipped=1)
    assert "netem queueing discipline (sch_netem" in result.stdout.str()
    result = run_inner(source, "--nsbox-require")
    result.assert_outcomes(passed=1, errors=1)


@pytest.mark.parametrize("step", ["make_private_network", "connect_network", "write_hosts"])
def test_a_failed_network_step_leaves_the_test_unrun(run_inner, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    monkeypatch.setenv("PYTEST_NSBOX_FAULT", step)
    # write_hosts runs only when a service is on the network (the service's own sandbox has none before it)
    service = (
        "@pytest.fixture(scope='session', autouse=True)\ndef echo(nsbox_service):\n    nsbox_service('echo', command=ECHO)\n"
    )
    result = run_inner(
        ECHO_SERVER
        + """
import pytest
from pytest_nsbox import nsbox

@nsbox(network="private")
def test_body():
    raise AssertionError("must not run")
"""
        + (service if step == "write_hosts" else ""),
        "--nsbox-require",
    )
    result.assert_outcomes(errors=1)  # a SKIP without --nsbox-require, as for every setup step
    failed = (
        f"network='private' is unavailable here: .*step {step}: " if step == "make_private_network" else f"step {step} failed: "
    )
    assert re.search(rf"ERROR test_inner.py::test_body - .*{failed}.*fault injected by PYTEST_NSBOX_FAULT", result.stdout.str())


def test_the_forked_form_fails_closed(run_inner) -> None:
    result = run_inner(
        """
from pytest_nsbox import nsbox

@nsbox(network="private")
def test_private():
    raise AssertionError("must not run")
""",
        "-o",
        "nsbox_prebuild=false",
    )
    result.assert_outcomes(skipped=1)
    assert "network='private' is unavailable here" in result.stdout.str()


BUILDER_OR_NETWORK = re.compile(rb"pytest_nsbox\.box\.(network|builder) import serve")


def test_xdist_workers_each_have_their_own_network_and_leave_nothing(run_inner, pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    result = run_inner(
        ECHO_SERVER
        + """
import os
import pytest
from pytest_nsbox import nsbox

@pytest.fixture(scope="session")
def echo(nsbox_service):
    return nsbox_service("echo", command=ECHO, ready_port=7000)

@pytest.fixture(scope="session", autouse=True)
def record_worker_pid():
    with open(f"worker-{os.getpid()}", "w"):
        pass

@pytest.mark.parametrize("n", range(20))
@nsbox(network="private")
def test_many(echo, n):
    assert ask("echo", 7000, str(n).encode()) == b"echo:" + str(n).encode()
""",
        "-n",
        "2",
    )
    result.assert_outcomes(passed=20)
    import helpers

    workers = [path.name.removeprefix("worker-") for path in pytester.path.glob("worker-*")]
    assert len(workers) == 2
    left = [p for p in helpers.processes() if BUILDER_OR_NETWORK.search(b" ".join(p.argv)) and p.argv[-1].decode() in workers]
    assert left == []


def test_doctor_reports_the_private_networks_needs(pytester: pytest.Pytester) -> None:
    result = pytester.run(sys.executable, "-m", "pytest_nsbox", "doctor")
    out = result.stdout.str()
    assert re.search(r"ok\s+veth links \(network='private'\): ok", out)
    assert re.search(r"ok\s+bridge links \(network='private'\): ok", out)
    assert re.search(r"(ok|WARN)\s+netem \(sch_netem: network delay, jitter, loss\)", out)


SOAK_CONFTEST = """
import os

def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker is a P: record its pid
        open(f"worker-{os.getpid()}", "w").close()
"""


def _left_by(workers: set[int], token: str) -> list[str]:
    """Processes of runs whose Ps were *workers*: N and the builder (their argv ends with P's pid),
    services (*token* in their command line)."""
    import helpers

    left = []
    for process in helpers.processes():
        line = b" ".join(process.argv)
        if (BUILDER_OR_NETWORK.search(line) and process.argv[-1].isdigit() and int(process.argv[-1]) in workers) or (
            token.encode() in line and b"pytest" not in process.argv[0]
        ):
            left.append(f"{process.pid}: {line[:120]!r}")
    return left


def _wait_until_gone(workers: set[int], token: str, timeout: float = 30.0) -> list[str]:
    import time

    deadline = time.monotonic() + timeout
    while (left := _left_by(workers, token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
def test_hundreds_of_tests_and_a_kill_9_leave_nothing_behind(pytester: pytest.Pytester) -> None:
    """500 tests on the private network under -n 2, then a run killed with SIGKILL halfway: no
    network process, builder or service of those runs is left, the host's interfaces are as they
    were, and the next run works."""
    import signal
    import subprocess
    import time

    pytest.importorskip("xdist")
    token = f"soak-token-{os.getpid()}"
    interfaces = sorted(os.listdir("/sys/class/net"))
    pytester.makeconftest(SOAK_CONFTEST)
    pytester.makepyfile(
        test_soak=ECHO_SERVER.replace('"-c", """', f'"-c", "# {token}\\n" + """')
        + """
import os
import pytest
from pytest_nsbox import nsbox

@pytest.fixture(scope="session")
def echo(nsbox_service):
    return nsbox_service("echo", command=ECHO, ready_port=7000)

@pytest.mark.parametrize("n", range(int(os.environ["SOAK_TESTS"])))
@nsbox(network="private")
def test_private(echo, n):
    if n % 50 == 0:
        assert ask("echo", 7000, b"x") == b"echo:x"
"""
    )
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "2", "test_soak.py"]
    env = {
        **os.environ,
        "SOAK_TESTS": "500",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])),
    }

    def workers() -> set[int]:
        found = {int(path.name.removeprefix("worker-")) for path in pytester.path.glob("worker-*")}
        for path in pytester.path.glob("worker-*"):
            path.unlink()
        return found

    done = subprocess.run(command, cwd=pytester.path, env=env, capture_output=True, text=True, timeout=900)
    assert "500 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert _wait_until_gone(workers(), token) == []
    assert sorted(os.listdir("/sys/class/net")) == interfaces

    killed = subprocess.Popen(command, cwd=pytester.path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(pytester.path.glob("worker-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(3)  # well into the run: services up, sandboxes on the network, plumbing under way
    running = {int(path.name.removeprefix("worker-")) for path in pytester.path.glob("worker-*")}
    for pid in (killed.pid, *running):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed.wait()
    assert _wait_until_gone(workers(), token) == []
    assert sorted(os.listdir("/sys/class/net")) == interfaces

    again = subprocess.run(
        command, cwd=pytester.path, env={**env, "SOAK_TESTS": "20"}, capture_output=True, text=True, timeout=300
    )
    assert "20 passed" in again.stdout, again.stdout[-3000:]
    assert _wait_until_gone(workers(), token) == []


@pytest.mark.needs_cgroup_limits
def test_a_services_memory_limit_takes_its_share_of_the_budget(
    run_inner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # a ledger of its own: other runs' sandboxes do not count
    result = run_inner(
        ECHO_SERVER
        + """
import pytest
from pytest_nsbox import nsbox
from pytest_nsbox.services import ServiceError

def test_too_big_for_the_budget(nsbox_service):
    with pytest.raises(ServiceError, match="nsbox_service 'big': .*memory limit of 1 GiB .*budget of 512 MiB"):
        nsbox_service("big", command=ECHO, ready_port=7000, memory="1G")

def test_held_while_it_runs(nsbox_service, request):
    ledger = request.config.stash[__import__("pytest_nsbox.plugin").plugin.RUNNER_KEY].budget
    before = ledger.in_use()
    service = nsbox_service("small", command=ECHO, ready_port=7000, memory="300M")
    assert ledger.in_use() == before + 300 * 2**20
    service.stop()
    assert ledger.in_use() == before

@nsbox(memory="300M")
def test_a_test_still_fits_after_it(nsbox_service):
    pass
""",
        "--nsbox-memory-budget=512M",
        "-p",
        "no:randomly",
    )
    result.assert_outcomes(passed=3)


def test_what_a_test_sends_on_its_control_connection_cannot_harm_the_network_process(run_inner, tmp_path: Path) -> None:
    """The test's nsbox_network connection reaches N, outside every sandbox: N takes data only
    (JSON), checks it, drops a connection that sends garbage, and goes on for the next tests."""
    proof = tmp_path / "escaped"
    result = run_inner(
        ECHO_SERVER
        + f"""
import json, os, pickle, socket
import pytest
from pytest_nsbox import nsbox

@pytest.fixture(scope="module")
def echo(nsbox_service):
    return nsbox_service("echo", command=ECHO, ready_port=7000)

class Evil:
    def __reduce__(self):
        return (os.system, ("touch {proof}",))

@nsbox(network="private")
def test_pickle(echo, nsbox_network):
    control = nsbox_network._control
    socket.send_fds(control, [pickle.dumps(Evil())], [])
    from pytest_nsbox.box.network import NetworkError
    with pytest.raises(NetworkError, match="gone|exited"):  # N dropped the connection
        nsbox_network.heal()

@nsbox(network="private")
def test_bad_values_and_descriptors(echo, nsbox_network):
    from pytest_nsbox.box.network import NetworkError
    for faults in ({{"delay_us": -1, "jitter_us": 0, "loss_percent": 0, "rate_bits": None}}, "x", {{"delay_us": 0}}):
        with pytest.raises(NetworkError, match="invalid"):
            nsbox_network._call("set_faults", name="echo", faults=faults)
    r, w = os.pipe()
    socket.send_fds(nsbox_network._control, [json.dumps({{"kind": "heal"}}).encode()], [r, w])
    assert json.loads(nsbox_network._control.recv(1000)) == {{}}

@nsbox(network="private")
def test_the_network_goes_on(echo):
    assert ask("echo", 7000) == b"echo:hi"
""",
        "-p",
        "no:randomly",
    )
    result.assert_outcomes(passed=3)
    assert not proof.exists()


def test_an_exposed_port_ends_with_the_fixture_that_exposed_it(run_inner) -> None:
    result = run_inner(
        """
import socket, socketserver, threading
import pytest
from pytest_nsbox import nsbox

class Hello(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"hello")

PORT = {}

class TestWithServer:
    @pytest.fixture(scope="class")
    def server(self, nsbox_host_ports):
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Hello)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        nsbox_host_ports.expose(server.server_address[1])
        PORT["port"] = server.server_address[1]
        yield
        server.shutdown()  # the port stays bound (not closed): only the exposure can hide it

    @nsbox(network="private")
    def test_reached(self, server):
        with socket.create_connection(("127.0.0.1", PORT["port"]), timeout=5) as c:
            assert c.recv(10) == b"hello"

@nsbox(network="private")
def test_not_after_the_class():
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", PORT["port"]), timeout=5)
""",
        "-p",
        "no:randomly",
    )
    result.assert_outcomes(passed=2)


def test_heal_restores_a_services_own_faults(run_inner) -> None:
    result = run_inner(
        '''
import socket, sys, time
import pytest
from pytest_nsbox import Network, nsbox

# a service that reads what it is sent to the end, then answers "ok"
SINK = [sys.executable, "-c", """
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7002)); s.listen()
def serve(c):
    with c:
        while c.recv(65536):
            pass
        try:
            c.sendall(b"ok")
        except OSError:
            pass
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""]

@pytest.fixture(scope="module")
def sink(nsbox_service):
    return nsbox_service("sink", command=SINK, ready_port=7002, network=Network(rate="200kbit"))

def upload():
    start = time.monotonic()
    with socket.create_connection(("sink", 7002), timeout=30) as c:
        c.sendall(b"x" * 60000)
        c.shutdown(socket.SHUT_WR)
        assert c.recv(10) == b"ok"
    return time.monotonic() - start

@nsbox(network="private")
def test_partition_then_heal(sink, nsbox_network):
    nsbox_network.partition("sink")
    nsbox_network.heal()
    assert upload() >= 1.5  # what the service receives is still limited: 60 kB at 25 kB/s

@nsbox(network="private")
def test_still_limited_in_the_next_test(sink):
    assert upload() >= 1.5
''',
        "-p",
        "no:randomly",
    )
    result.assert_outcomes(passed=2)


@pytest.mark.needs_cgroup_limits
def test_a_test_that_cannot_fit_beside_the_services_is_an_error_not_a_hang(
    run_inner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # a ledger of its own
    result = run_inner(
        ECHO_SERVER
        + """
import pytest
from pytest_nsbox import nsbox

@pytest.fixture(scope="module")
def big(nsbox_service):
    return nsbox_service("big", command=ECHO, ready_port=7000, memory="400M")

@nsbox(memory="200M", network="private")
def test_beside(big):
    raise AssertionError("must not run")
""",
        "--nsbox-memory-budget=512M",
        timeout=120,
    )
    result.assert_outcomes(errors=1)
    assert "does not fit in the memory budget of 512 MiB" in result.stdout.str()
    assert "big: 400 MiB" in result.stdout.str()


def test_a_service_gets_none_of_pytests_environment_but_path(run_inner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSBOX_TEST_SECRET_TOKEN", "hunter2")
    result = run_inner(
        """
import os, sys, time
import pytest

def test_env(nsbox_service):
    show = "import os, time; print(sorted(os.environ), flush=True); time.sleep(60)"
    service = nsbox_service("env", command=[sys.executable, "-c", show],
                            ready_log="PATH", env={"GIVEN": "yes"})
    logged = service.logs()
    assert "NSBOX_TEST_SECRET_TOKEN" not in logged and "hunter2" not in logged
    assert "'GIVEN'" in logged and "'PATH'" in logged
"""
    )
    result.assert_outcomes(passed=1)
