"""hypothesis's example database across the sandbox: what a sandboxed test saves, the next run replays.

hypothesis keeps the failing examples it finds in a directory database (by default
``.hypothesis/examples`` under the cwd, i.e. the rootdir, which a sandbox sees as a throwaway
overlay). ``ExampleDatabase`` carries the test's changes to it out: in C it lists the database's
entries before the test and after, and sends what was added (with its bytes) and what was removed;
P makes the same changes to the real directory.

P trusts nothing in the record: the directories are those P itself finds in the item's hypothesis
settings; an entry is ``<key hash>/<value hash>`` (the 16 hex digits hypothesis names them by), so it
cannot leave its directory; P writes regular files only (never through a symlink, atomically like
hypothesis) and removes only regular files; sizes and counts are capped.

Directory databases only (``DirectoryBasedExampleDatabase``, also inside ``MultiplexedDatabase``
and ``BackgroundWriteDatabase``); others (in memory, Redis, GitHub artifacts) live outside the
sandbox's filesystem or nowhere, and need nothing. A test killed by a limit carries nothing back.
"""

from __future__ import annotations

import base64
import os
import re
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

import pytest

MAX_VALUE_BYTES: Final = 1 * 2**20  # hypothesis's own entries are choice sequences of a few KiB
MAX_TOTAL_BYTES: Final = 16 * 2**20  # per test
MAX_ENTRIES: Final = 10_000  # per test, saves and deletes together
ENTRY: Final = re.compile(r"[0-9a-f]{16}/[0-9a-f]{16}")
_TEMP_PREFIX: Final = ".nsbox-"


def database_dirs(item: pytest.Item) -> list[str]:
    """The directories of the directory databases the item's hypothesis test uses (absolute)."""
    hypothesis = sys.modules.get("hypothesis")  # never imported here: the user's run did, or nothing to do
    if hypothesis is None or item.get_closest_marker("hypothesis") is None:
        return []
    test_settings = getattr(getattr(item, "obj", None), "_hypothesis_internal_use_settings", None)
    settings = test_settings if test_settings is not None else hypothesis.settings.default
    dirs: list[str] = []
    for database in _unwrapped(settings.database):
        path = getattr(database, "path", None)
        if isinstance(path, Path) and type(database).__name__ in ("DirectoryBasedExampleDatabase", "_StorageDirectoryDatabase"):
            absolute = os.path.abspath(path)
            if absolute not in dirs:
                dirs.append(absolute)
    return dirs


def _unwrapped(database: Any) -> list[Any]:
    """The databases behind hypothesis's wrappers (multiplexed, background writes)."""
    kind = type(database).__name__
    if kind == "MultiplexedDatabase":
        return [db for wrapped in getattr(database, "_wrapped", ()) for db in _unwrapped(wrapped)]
    if kind == "BackgroundWriteDatabase":
        return _unwrapped(getattr(database, "_db", None))
    return [database] if database is not None else []


def _flush(item: pytest.Item) -> None:
    """In C: wait for writes a ``BackgroundWriteDatabase`` still holds."""
    hypothesis = sys.modules.get("hypothesis")  # never imported here: the user's run did, or nothing to do
    if hypothesis is None:
        return
    test_settings = getattr(getattr(item, "obj", None), "_hypothesis_internal_use_settings", None)
    settings = test_settings if test_settings is not None else hypothesis.settings.default
    pending = [settings.database]
    while pending:
        database = pending.pop()
        kind = type(database).__name__
        if kind == "BackgroundWriteDatabase":
            join = getattr(database, "_join", None)
            if callable(join):
                join(5.0)
            pending.append(getattr(database, "_db", None))
        elif kind == "MultiplexedDatabase":
            pending.extend(getattr(database, "_wrapped", ()))


def entries(directory: str) -> set[str]:
    """``<key hash>/<value hash>`` of every regular file in a directory database."""
    found: set[str] = set()
    try:
        keys = os.scandir(directory)
    except OSError:
        return found
    with keys:
        for key in keys:
            if not key.is_dir(follow_symlinks=False) or len(key.name) != 16:
                continue
            try:
                with os.scandir(key.path) as values:
                    found.update(f"{key.name}/{v.name}" for v in values if v.is_file(follow_symlinks=False))
            except OSError:
                continue
    return {entry for entry in found if ENTRY.fullmatch(entry)}


class ExampleDatabase:
    """Carries hypothesis's example-database changes from C to P (see the module docstring)."""

    name = "hypothesis"

    def __init__(self) -> None:
        self._before: dict[str, set[str]] = {}

    def active(self, config: pytest.Config) -> bool:
        return config.pluginmanager.has_plugin("hypothesispytest")

    def before(self, item: pytest.Item) -> None:
        self._before = {directory: entries(directory) for directory in database_dirs(item)}

    def collect(self, item: pytest.Item) -> Any:
        if not self._before:
            return None
        _flush(item)
        changes = []
        for directory, before in self._before.items():
            after = entries(directory)
            saved = []
            for entry in sorted(after - before):
                try:
                    saved.append([entry, base64.b64encode(_read_regular(os.path.join(directory, entry))).decode()])
                except OSError:
                    continue  # removed again, or not a regular file
            deleted = sorted(before - after)
            if saved or deleted:
                changes.append({"dir": directory, "saved": saved, "deleted": deleted})
        return changes or None

    def apply(self, item: pytest.Item, value: Any) -> None:
        allowed = set(database_dirs(item))
        if not isinstance(value, list):
            raise ValueError(f"expected a list of changes, got {type(value).__name__}")
        total = count = 0
        plan: list[tuple[str, list[tuple[str, bytes]], list[str]]] = []
        for change in value:
            if not isinstance(change, dict) or change.get("dir") not in allowed:
                raise ValueError(f"changes to a directory that is not the test's example database: {str(change)[:200]}")
            saved, deleted = change.get("saved"), change.get("deleted")
            if not isinstance(saved, list) or not isinstance(deleted, list):
                raise ValueError("malformed changes")
            decoded = []
            for pair in saved:
                if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], str)):
                    raise ValueError(f"malformed saved entry {str(pair)[:200]}")
                _check_entry(pair[0])
                data = base64.b64decode(pair[1], validate=True)
                if len(data) > MAX_VALUE_BYTES:
                    raise ValueError(f"entry {pair[0]} is {len(data)} bytes (at most {MAX_VALUE_BYTES})")
                total += len(data)
                decoded.append((pair[0], data))
            for entry in deleted:
                _check_entry(entry)
            count += len(saved) + len(deleted)
            if total > MAX_TOTAL_BYTES or count > MAX_ENTRIES:
                raise ValueError(f"too much: {count} entries, {total} bytes (at most {MAX_ENTRIES}, {MAX_TOTAL_BYTES})")
            plan.append((str(change["dir"]), decoded, [str(e) for e in deleted]))
        for directory, saves, deletes in plan:
            for entry, data in saves:
                _save(directory, entry, data)
            for entry in deletes:
                _delete(directory, entry)


def _check_entry(entry: object) -> None:
    if not isinstance(entry, str) or not ENTRY.fullmatch(entry):
        raise ValueError(f"not a database entry: {str(entry)[:80]!r}")


def _read_regular(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_VALUE_BYTES:
            raise OSError(f"{path}: not a regular file of at most {MAX_VALUE_BYTES} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_VALUE_BYTES + 1)
    finally:
        os.close(fd)


def _real_dir(path: str) -> None:
    """Create *path* (one level) if missing; refuse anything but a directory (a symlink included)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise ValueError(f"{path} is not a directory")


def _save(directory: str, entry: str, data: bytes) -> None:
    """Write one entry as hypothesis does: a temporary file renamed into place."""
    os.makedirs(directory, exist_ok=True)  # the user's own setting: P found it, C did not name it
    key, _ = entry.split("/")
    _real_dir(os.path.join(directory, key))
    target = os.path.join(directory, entry)
    if os.path.lexists(target):
        return  # content-addressed: the same name holds the same bytes
    fd, temporary = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise


def _delete(directory: str, entry: str) -> None:
    """Remove one entry (a regular file only), and its key directory once empty, as hypothesis does."""
    path = os.path.join(directory, entry)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return
        os.unlink(path)
    except FileNotFoundError:
        return
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass
