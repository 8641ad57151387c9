"""Fixtures for the pytest-nsbox demo.

Where fixtures run matters (see DESIGN.md "Process model"):

* session-, module- and class-scoped fixtures run in the pytest process itself, on the HOST,
  before the sandbox is forked; the sandboxed test inherits their values;
* function-scoped fixtures run inside the sandbox, with the test.

So the canary below is planted on the real host filesystem, and sandboxed tests see it through
their throwaway overlay of "/".
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parent
DEMO_ETC_DIR = Path("/etc/nsbox-demo")  # created only inside sandboxes, never on the host


@dataclass(frozen=True)
class Canary:
    """A directory of throwaway files planted on the host for destructive tests to delete."""

    path: Path
    files: dict[str, str]  # file name -> content
    host_hostname: str  # /etc/hostname of the host, read on the host before any sandbox ran
    etc_dir: Path = DEMO_ETC_DIR  # sandboxed tests create it; it must never appear on the host

    def intact(self) -> bool:
        """Every planted file is still there with its content."""
        return all(
            (self.path / name).is_file() and (self.path / name).read_text() == text for name, text in self.files.items()
        )


@pytest.fixture(scope="session")
def canary() -> Iterator[Canary]:
    """Plant a fresh canary directory (on the host: this fixture is session-scoped)."""
    if DEMO_ETC_DIR.exists():
        pytest.skip(f"{DEMO_ETC_DIR} already exists on this host; the demo expects to be the only one using it")
    # A hidden, uniquely named directory next to the examples; removed again at the end of the session.
    path = Path(tempfile.mkdtemp(prefix=".nsbox-demo-canary-", dir=EXAMPLES_DIR))
    files = {f"file{i}.txt": f"canary {i} planted by pid {os.getpid()}\n" for i in range(3)}
    for name, text in files.items():
        (path / name).write_text(text)
    try:
        host_hostname = Path("/etc/hostname").read_text()
    except OSError:
        host_hostname = ""
    yield Canary(path, files, host_hostname)
    shutil.rmtree(path, ignore_errors=True)  # our own canary, nothing else


@pytest.fixture(scope="session")
def host_interfaces() -> list[str]:
    """The host's network interface names (read on the host: session scope)."""
    return sorted(name for _, name in socket.if_nameindex())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Show what each expected failure (test_crash.py) actually failed with.

    pytest prints only the xfail reason for an XFAIL; this prints the sandbox's own message,
    e.g. "crashed with signal SIGSEGV".
    """
    xfailed = terminalreporter.stats.get("xfailed", [])
    if xfailed:
        terminalreporter.section("how the expected failures failed")
        for report in xfailed:
            message = report.longreprtext.strip().splitlines()[-1] if report.longreprtext.strip() else "(no message)"
            terminalreporter.write_line(f"{report.nodeid}: {message}")
