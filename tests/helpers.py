"""What the tests look for on the host and in the sandbox: processes, cgroups, scratch dirs, descriptors.

Importable as ``helpers`` by the test files, and by the inner pytest that ``run_inner`` starts (its
PYTHONPATH has this directory). Code that runs in a sandbox must import this module before the
sandbox is built (at the top of the inner test file): after pivot_root nothing new can be imported
unless its directory is on sys.path.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

BUILDER_TOKEN: Final = b"pytest_nsbox.box.builder import serve"  # in the sandbox builder's command line

PID_FILE_CONFTEST: Final = """
import os

def pytest_sessionfinish(session):
    open("pid", "w").write(str(os.getpid()))
"""
"""An inner conftest: the inner pytest writes its pid to ./pid when the session ends."""


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    argv: tuple[bytes, ...]


def processes() -> Iterator[Process]:
    """Every process this one can see (those that vanish meanwhile, and zombies, are left out)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
        except OSError:
            continue
        if cmdline:
            yield Process(int(entry), ppid, tuple(cmdline.rstrip(b"\0").split(b"\0")))


def processes_with(token: str | bytes) -> list[int]:
    """Processes whose command line contains *token*."""
    needle = token.encode() if isinstance(token, str) else token
    return [p.pid for p in processes() if needle in b"\0".join(p.argv)]


def _is_builder(process: Process) -> bool:
    return BUILDER_TOKEN in b"\0".join(process.argv)


def builders_of(pid: int | str) -> list[int]:
    """Sandbox builder processes of pytest process *pid*, and their forks: their argv ends with its pid
    (also once *pid* is gone and they were reparented)."""
    return [p.pid for p in processes() if _is_builder(p) and p.argv[-1] == str(pid).encode()]


def child_builders() -> list[int]:
    """The sandbox builders this process started (its children; not the builders' own forks)."""
    return [p.pid for p in processes() if _is_builder(p) and p.ppid == os.getpid()]


def cgroups_of(pid: int | str) -> list[str]:
    """Sandbox cgroups (nsbox-<pid>-<n>) of pytest process *pid*, anywhere under /sys/fs/cgroup."""
    found = []
    for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup"):
        found += [f"{dirpath}/{d}" for d in dirnames if d.startswith(f"nsbox-{pid}-")]
    return found


def sandbox_cgroups(root_setting: str) -> set[Path]:
    """Every sandbox cgroup (any owner) under the cgroup root that *root_setting* selects."""
    from pytest_nsbox.box import cgroups

    manager = cgroups.detect(root_setting)
    assert manager is not None
    found = set()
    for root in manager.roots():
        if root.is_dir():
            found.update(p for p in root.iterdir() if cgroups.NAME_RE.match(p.name))
    return found


def orphaned_scratch_dirs() -> list[str]:
    """Scratch mount points (pytest-nsbox-<pid>-*) whose pytest process is gone."""
    found = []
    for name in os.listdir(tempfile.gettempdir()):
        match = re.match(r"pytest-nsbox-(\d+)-", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            found.append(name)
    return found


def open_descriptors() -> int:
    """How many descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def fifos() -> list[int]:
    """This process's pipe descriptors open for writing, other than 0-2 (in a sandboxed test: the
    result pipe; pytest's saved copy of a piped stdin is kept too, but read-only)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and stat.S_ISFIFO(os.fstat(fd).st_mode):
                if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
                    found.append(fd)
        except OSError:  # the directory's own descriptor, closed by now
            pass
    return found


@dataclass(frozen=True)
class JunitCase:
    """One testcase of a junit-xml file: its time, its failure's or error's message, its properties."""

    time: float
    message: str | None
    properties: dict[str, str]
    text: str = ""  # the failure's or error's full text


def junit_cases(path: Path) -> dict[str, JunitCase]:
    """The testcases of the junit-xml file *path*, by test name."""
    import xml.etree.ElementTree as ET

    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        properties = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        message = problem.get("message") if problem is not None else None
        text = (problem.text or "") if problem is not None else ""
        cases[case.get("name", "")] = JunitCase(float(case.get("time", "0")), message, properties, text)
    return cases


def phase_durations(output: str, phase: str) -> dict[str, float]:
    """Seconds per test of *phase* in the ``--durations`` table of pytest's *output*."""
    pattern = re.compile(rf"^([0-9.]+)s {phase}\s+\S+::(\S+)$", re.MULTILINE)
    return {name: float(seconds) for seconds, name in pattern.findall(output)}


RESOLVER_CASES: Final = {
    (family_name, flags_name): (family, flags)
    for family_name, family in (("AF_UNSPEC", socket.AF_UNSPEC), ("AF_INET", socket.AF_INET), ("AF_INET6", socket.AF_INET6))
    for flags_name, flags in (
        ("0", 0),
        ("AI_ADDRCONFIG", socket.AI_ADDRCONFIG),
        ("AI_PASSIVE|AI_ADDRCONFIG", socket.AI_PASSIVE | socket.AI_ADDRCONFIG),
    )
}
"""getaddrinfo's family and flags, by name: each way a program may ask for localhost."""


def resolve(name: str, family: int = socket.AF_UNSPEC, flags: int = 0) -> list[str] | None:
    """The sorted addresses getaddrinfo gives for *name*, or None if it gives none (any gaierror:
    without a network, a DNS lookup fails differently)."""
    try:
        infos = socket.getaddrinfo(name, 0, family, socket.SOCK_STREAM, 0, flags)
    except socket.gaierror:
        return None
    return sorted(str(info[4][0]) for info in infos)


def resolve_localhost() -> dict[str, list[str] | None]:
    """resolve("localhost") for each of RESOLVER_CASES, keyed "family flags"."""
    return {f"{f} {g}": resolve("localhost", *case) for (f, g), case in RESOLVER_CASES.items()}


def bound_by_create_server(host: str) -> list[str]:
    """The addresses asyncio's ``create_server(host, 0)`` binds."""

    async def serve() -> list[str]:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, 0)
        try:
            return sorted(str(sock.getsockname()[0]) for sock in server.sockets)
        finally:
            server.close()

    return asyncio.run(serve())


def hosts_lookups(hosts_text: str) -> dict[str, object]:
    """What each address (gethostbyaddr) and name (getaddrinfo) of an /etc/hosts text resolves to."""
    seen: dict[str, object] = {}
    for line in hosts_text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            seen[fields[0]] = list(socket.gethostbyaddr(fields[0])[:2])
        except OSError:
            seen[fields[0]] = None
        for name in fields[1:]:
            seen[name] = resolve(name)
    return seen


SUMMARY_TIME: Final = re.compile(r" in [0-9.]+s( \([0-9:]+\))?")


def summary_line(result: Any) -> str:
    """The last line of a pytester run (``3 failed, 4 passed, 11 subtests passed``) without its time."""
    line = next(line for line in reversed(result.outlines) if line.strip())
    return SUMMARY_TIME.sub("", line.strip("= "))
