"""The memory budget: sandboxes with a memory limit start only while the limits fit.

One ledger per user and machine (``$XDG_RUNTIME_DIR/pytest-nsbox`` or ``/tmp/pytest-nsbox-ledger-<uid>``),
shared by every xdist worker and every pytest run of that user: a directory with one entry per
running sandbox that has a memory limit, named after the pytest process that started it (pid and
start time, so a reused pid is not mistaken for it) and holding the limit in bytes. Every change
happens under an exclusive ``flock`` of the ledger's lock file. A sandbox is admitted when the sum
of the entries plus its own limit fits in the run's budget; otherwise the test waits and tries
again. Entries of processes that are gone (a run killed with SIGKILL) are removed by the next
admission. Sandboxes without a memory limit are not counted: their need is unknown.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .errors import NsboxError

LOCK_FILE: Final = "ledger.lock"
ENTRY_SUFFIX: Final = ".limit"
POLL_SECONDS: Final = 0.05  # how often a waiting test looks again
BESIDE_SERVICES: Final = (
    "nsbox: memory limit of {limit} does not fit in the memory budget of {budget} ({source}) beside the "
    "services this run holds ({services}): it would wait for them forever; lower the limit, stop a service "
    "sooner, or raise the budget with --nsbox-memory-budget"
)
TOO_BIG: Final = (
    "nsbox: memory limit of {limit} is bigger than the whole memory budget of {budget} ({source}); "
    "lower the limit, or raise the budget with --nsbox-memory-budget"
)


class BudgetError(NsboxError):
    """A limit that can never be admitted, or a ledger that cannot be used."""


def default_ledger_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return Path(runtime) / "pytest-nsbox"
    return Path(tempfile.gettempdir()) / f"pytest-nsbox-ledger-{os.getuid()}"  # not a scratch dir name (pytest-nsbox-<pid>-...)


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _living_entries(directory: Path) -> Iterator[tuple[Path, bool]]:
    """Each ledger entry, and whether the run that made it is still alive."""
    for entry in directory.glob(f"*{ENTRY_SUFFIX}"):
        pid, _, rest = entry.name.partition(".")
        yield entry, pid.isdigit() and _start_time(int(pid)) == rest.partition(".")[0]


def _limit(entry: Path) -> int:
    try:
        return int(entry.read_text())
    except (OSError, ValueError):
        return 0


def promised(directory: Path) -> int:
    """What the living entries of the ledger at *directory* hold now, in bytes (read without the lock)."""
    if not directory.is_dir():
        return 0
    return sum(_limit(entry) for entry, alive in _living_entries(directory) if alive)


@dataclass(frozen=True, slots=True)
class Admission:
    """A sandbox's place in the ledger; *waited*: the seconds it waited for it (0: it fit at once)."""

    entry: Path
    waited: float


class MemoryLedger:
    """Admits memory limits against *budget* bytes, in the ledger at *directory*."""

    def __init__(self, directory: Path, budget: int, source: str) -> None:
        self.directory = directory
        self.budget = budget
        self.source = source  # where the budget came from, for messages
        self._owner = f"{os.getpid()}.{_start_time(os.getpid())}"
        self._sequence = itertools.count()

    def _ensure_dir(self) -> None:
        """The ledger directory, created 0700; one that another user could write to (or a
        symlink planted in /tmp) is refused, not used."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = os.lstat(self.directory)
        if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o022:
            raise BudgetError(
                f"nsbox: memory ledger {self.directory} is not a directory of yours alone (owner uid {status.st_uid}, "
                f"mode {stat.filemode(status.st_mode)}); remove it or set --nsbox-memory-budget=0"
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def check(self, limit: int, held: dict[str, int] | None = None) -> None:
        """BudgetError if *limit* can never fit (also beside what this process *held*: its
        services' limits by name, which stay while it waits), or the ledger cannot be used."""
        from .spec import format_size

        if limit > self.budget:
            raise BudgetError(TOO_BIG.format(limit=format_size(limit), budget=format_size(self.budget), source=self.source))
        if held and limit + sum(held.values()) > self.budget:
            services = ", ".join(f"{name}: {format_size(size)}" for name, size in held.items())
            raise BudgetError(
                BESIDE_SERVICES.format(
                    limit=format_size(limit), budget=format_size(self.budget), source=self.source, services=services
                )
            )
        try:
            self._ensure_dir()
        except OSError as exc:
            raise BudgetError(f"nsbox: cannot use the memory ledger {self.directory}: {exc}") from None

    def in_use(self) -> int:
        """The limits of the running sandboxes, in bytes (dead owners' entries are removed)."""
        total = 0
        for entry, alive in _living_entries(self.directory):
            if not alive:
                entry.unlink(missing_ok=True)  # its run is gone: reclaim its share
                continue
            total += _limit(entry)
        return total

    def admit(self, limit: int) -> Admission:
        """Wait until *limit* fits beside the running sandboxes' limits, then take it."""
        self.check(limit)
        self._ensure_dir()
        start = time.monotonic()
        for attempt in itertools.count():
            with self._locked():
                if self.in_use() + limit <= self.budget:
                    entry = self.directory / f"{self._owner}.{next(self._sequence)}{ENTRY_SUFFIX}"
                    entry.write_text(str(limit))
                    return Admission(entry, time.monotonic() - start if attempt else 0.0)
            time.sleep(POLL_SECONDS)
        raise AssertionError("unreachable")

    def release(self, admission: Admission) -> None:
        with self._locked():
            admission.entry.unlink(missing_ok=True)
