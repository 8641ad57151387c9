"""What the tests look for on the host and in the sandbox: processes, cgroups, scratch dirs, descriptors.

Importable as ``helpers`` by the test files, and by the inner pytest that ``run_inner`` starts (its
PYTHONPATH has this directory). Code that runs in a sandbox must import this module before the
sandbox is built (at the top of the inner test file): after pivot_root nothing new can be imported
unless its directory is on sys.path.
"""

from __future__ import annotations

import os
import re
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
    """This process's pipe descriptors other than 0-2 (in a sandboxed test: the result pipe)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and stat.S_ISFIFO(os.fstat(fd).st_mode):
                found.append(fd)
        except OSError:  # the directory's own descriptor, closed by now
            pass
    return found


SUMMARY_TIME: Final = re.compile(r" in [0-9.]+s( \([0-9:]+\))?")


def summary_line(result: Any) -> str:
    """The last line of a pytester run (``3 failed, 4 passed, 11 subtests passed``) without its time."""
    line = next(line for line in reversed(result.outlines) if line.strip())
    return SUMMARY_TIME.sub("", line.strip("= "))
