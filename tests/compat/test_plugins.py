"""pytest-randomly, pytest-asyncio and xdist's distribution modes with sandboxed tests: each
scenario runs plain and with ``--nsbox-all`` and must go the same way."""

from __future__ import annotations

import re

import pytest

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]


def both(run_inner, source: str, *args: str) -> tuple[pytest.RunResult, pytest.RunResult]:
    return run_inner(source, *args), run_inner(source, "--nsbox-all", *args)


RANDOM_VALUES = """
import random, pytest

@pytest.mark.parametrize("n", range(4))
def test_value(n):
    print(f"VALUE {n} {random.random()!r}")
"""


def test_randomly_same_order_and_values(run_inner) -> None:
    """pytest-randomly shuffles and reseeds in P before the fork: the sandboxed test draws what it
    draws plain."""
    plain, sandboxed = both(run_inner, RANDOM_VALUES, "-s", "-p", "randomly", "--randomly-seed=1234")
    values = [re.findall(r"VALUE \d \S+", r.stdout.str()) for r in (plain, sandboxed)]
    assert len(values[0]) == 4 and values[0] == values[1]
    sandboxed.assert_outcomes(passed=4)
    other_seed = run_inner(RANDOM_VALUES, "-s", "-p", "randomly", "--randomly-seed=99", "--nsbox-all")
    assert re.findall(r"VALUE \d \S+", other_seed.stdout.str()) != values[0]


ASYNC = """
import asyncio, pytest, pytest_asyncio

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_data():
    await asyncio.sleep(0)
    return {"answer": 42}

@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def session_data():
    await asyncio.sleep(0)
    return [1, 2]

@pytest_asyncio.fixture
async def echo_server():
    async def handle(reader, writer):
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()

@pytest.mark.asyncio
async def test_function_loop(echo_server):
    reader, writer = await asyncio.open_connection("127.0.0.1", echo_server)
    writer.write(b"ping")
    await writer.drain()
    assert await reader.read(100) == b"ping"
    writer.close()

@pytest.mark.asyncio
async def test_wider_async_fixtures_values(module_data, session_data):
    await asyncio.sleep(0)
    assert module_data["answer"] == 42 and session_data == [1, 2]

@pytest.mark.asyncio
async def test_fails():
    await asyncio.sleep(0)
    assert 1 == 2
"""


def test_asyncio_function_loops_and_wider_fixture_values(run_inner) -> None:
    """Async tests and async fixtures on function-scoped loops; the values of module/session-scoped
    async fixtures (computed in P) reach the sandboxed test."""
    for result in both(run_inner, ASYNC, "-p", "no:randomly", "-o", "asyncio_default_fixture_loop_scope=function"):
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines(["*assert 1 == 2*"])


XDIST = """
import pytest

def stamp(tmp_path_factory, name):
    (tmp_path_factory.getbasetemp() / name).write_text("ran")

@pytest.mark.xdist_group("g1")
@pytest.mark.parametrize("n", range(3))
def test_group_one(tmp_path_factory, n):
    stamp(tmp_path_factory, f"g1-{n}")

@pytest.mark.xdist_group("g2")
@pytest.mark.parametrize("n", range(3))
def test_group_two(tmp_path_factory, n):
    stamp(tmp_path_factory, f"g2-{n}")

class TestScope:
    @pytest.mark.parametrize("n", range(3))
    def test_in_class(self, tmp_path_factory, n):
        stamp(tmp_path_factory, f"class-{n}")

def test_fails():
    assert False
"""


@pytest.mark.parametrize("dist", ["load", "loadscope", "loadgroup", "worksteal"])
def test_xdist_distribution(run_inner, dist: str) -> None:
    """Same outcomes as plain under each distribution mode (xdist schedules in the controller, P of
    each worker runs the sandboxes)."""
    for result in both(run_inner, XDIST, "-p", "no:randomly", "-n", "2", f"--dist={dist}", "-rA"):
        result.assert_outcomes(passed=9, failed=1)
        result.stdout.fnmatch_lines(["FAILED test_inner.py::test_fails*"])
