"""Coverage data of a sandboxed test, carried from the test process (C) to P.

C is a fork of P: coverage.py's tracer keeps running in it, but what it records would stay in
C (which ends with ``os._exit``), and P's data file is not C's to write: C inherited P's
``CoverageData``, perhaps with an open SQLite connection to it. So, in C, before the test:
the collector's pending lines (P's, which P still holds and saves itself) are dropped, and the
collector records into a fresh in-memory ``CoverageData``. After the test, C flushes into it,
merges the data files that Python subprocesses of the test wrote inside the sandbox, and sends
``CoverageData.dumps()``. Subprocesses measured through coverage's ``[run] patch = subprocess``
(the ``COVERAGE_PROCESS_CONFIG`` variable) write theirs into a directory on the sandbox's own
fresh ``/tmp`` (C points the variable's ``data_file`` there: the real data file's directory may
not be visible or writable inside); those measured otherwise
(``COVERAGE_PROCESS_START``) write ``<data_file>.<suffix>`` next to the data file, where C looks
for the ones that appeared during the test. Both vanish with the sandbox.
P merges it into the data of its running ``Coverage`` with ``CoverageData.update()``. Line sets
merge as unions, so each test's data is counted as it would be unsandboxed, branch arcs and
contexts (``--cov-context=test``) included.

The carrier is active only where coverage.py is imported, and does nothing while no
``Coverage`` is started (pytest-cov starts one per xdist worker at session start).
"""

from __future__ import annotations

import base64
import os
import sys
from typing import TYPE_CHECKING, Any, Final

import pytest

if TYPE_CHECKING:
    from coverage import Coverage, CoverageData

NAME: Final = "coverage"
LOST: Final = (
    "the test process ended before handing over its coverage data (killed by a limit or a signal, "
    "or it exited without reporting): the lines it ran are not in the coverage report"
)
SUBPROCESS_CONFIG_ENV: Final = "COVERAGE_PROCESS_CONFIG"  # set by coverage's [run] patch = subprocess
SUBPROCESS_START_ENV: Final = "COVERAGE_PROCESS_START"  # a config file, for coverage.process_startup()
SUBPROCESS_DATA_DIR: Final = "/tmp/pytest-nsbox-coverage"  # on the sandbox's own /tmp
PARTLY_LOST: Final = "the data file {path} of a subprocess could not be read: {detail}"


# --- coverage.py's private API: only here -----------------------------------------------------
# coverage.py (7.x) has no public way to redirect a running Coverage to another CoverageData, or
# to add data to its data without ``get_data()`` (which flushes and then walks every source dir
# for unexecuted files: too slow to call once per test), and the format of the variable that
# ``patch = subprocess`` hands to subprocesses is its own. These four functions are the only
# places pytest-nsbox touches its internals (``Coverage._collector``, ``Coverage._data``,
# ``Collector.data``/``covdata``, ``CoverageData._current_context``,
# ``CoverageConfig.serialize``/``deserialize``); tests/compat pins the version they were written
# against.


def _record_into(cov: Coverage, target: CoverageData) -> CoverageData:
    """In C: drop the collector's pending data (P's) and make it record into *target*; return
    the data it recorded into before (P's, never to be written by C)."""
    collector: Any = cov._collector
    inherited: Any = collector.covdata
    for recorded in collector.data.values():  # the tracers hold these sets: empty them in place
        recorded.clear()
    target.set_context(inherited._current_context)  # the dynamic context of the moment, if any
    collector.covdata = target
    cov._data = target  # anything that saves in C (patch=_exit) writes here, not to P's file
    return inherited  # type: ignore[no-any-return]


def _flush(cov: Coverage) -> None:
    """In C: move what the collector recorded into its CoverageData."""
    collector: Any = cov._collector
    collector.flush_data()


def _with_data_file(subprocess_config: str, data_file: str) -> str:
    """The value of COVERAGE_PROCESS_CONFIG with its data file replaced by *data_file*."""
    from coverage.config import CoverageConfig

    config = CoverageConfig.deserialize(subprocess_config)
    config.data_file = data_file
    return str(config.serialize())


def _data_of(cov: Coverage) -> CoverageData | None:
    """In P: the CoverageData the running Coverage saves (None: it has none yet)."""
    return cov._data


# --- the carrier ------------------------------------------------------------------------------


def _running() -> Coverage | None:
    """The started Coverage of this process, if any (never imports coverage)."""
    module = sys.modules.get("coverage")
    if module is None:
        return None
    cov: Coverage | None = module.Coverage.current()
    return cov


class CoverageCarrier:
    """Carries a sandboxed test's coverage data, its subprocesses' included, from C to P."""

    name = NAME

    def __init__(self) -> None:
        self._cov: Coverage | None = None  # in C: the Coverage recording the test
        self._data: CoverageData | None = None  # in C: where it records
        self._own_base_filename: str | None = None  # in C: where patch=subprocess data goes
        self._redirected: tuple[tuple[str, str], str] | None = None  # (COVERAGE_PROCESS_CONFIG, data
        # file name) -> its value for the sandbox: made once in P (apply), inherited by each C
        self._base_filename = ""  # in C, with COVERAGE_PROCESS_START: the data file subprocesses
        self._existing: set[str] = set()  # write theirs next to, and the files there before the test

    def active(self, config: pytest.Config) -> bool:
        if "coverage" not in sys.modules:  # never imports what the run did not
            return False
        import sqlite3.dump  # noqa: F401 - CoverageData.dumps() imports it: once here, not in every C

        return True

    def before(self, item: pytest.Item) -> None:
        cov = _running()
        self._cov = cov
        if cov is None:
            return
        from coverage import CoverageData

        self._data = CoverageData(no_disk=True)
        inherited = _record_into(cov, self._data)
        redirected = self._redirect_subprocesses(inherited.base_filename())
        if redirected is not None:  # patch = subprocess: into a directory of our own
            os.makedirs(SUBPROCESS_DATA_DIR, exist_ok=True)
            self._own_base_filename = redirected[0]
            os.environ[SUBPROCESS_CONFIG_ENV] = redirected[1]
        elif os.environ.get(SUBPROCESS_START_ENV) is not None:  # a config file names the data file
            from coverage.data import combinable_files

            self._base_filename = inherited.base_filename()
            self._existing = set(combinable_files(self._base_filename))

    def _redirect_subprocesses(self, base_filename: str) -> tuple[str, str] | None:
        """(data file, value of COVERAGE_PROCESS_CONFIG) that make the test's subprocesses write
        their data into the sandbox's own directory; None: patch = subprocess is not in use."""
        subprocess_config = os.environ.get(SUBPROCESS_CONFIG_ENV)
        if subprocess_config is None:
            return None
        own_base_filename = os.path.join(SUBPROCESS_DATA_DIR, os.path.basename(base_filename))
        key = (subprocess_config, own_base_filename)
        if self._redirected is None or self._redirected[0] != key:
            self._redirected = (key, _with_data_file(subprocess_config, own_base_filename))
        return own_base_filename, self._redirected[1]

    def collect(self, item: pytest.Item) -> dict[str, Any] | None:
        cov, data = self._cov, self._data
        if cov is None or data is None:
            return None
        from coverage import CoverageData
        from coverage.data import combinable_files

        _flush(cov)
        problems = []
        written_files = set()
        if self._base_filename:
            written_files.update(set(combinable_files(self._base_filename)) - self._existing)
        if self._own_base_filename is not None:
            written_files.update(combinable_files(self._own_base_filename))
        for path in sorted(written_files):
            try:
                written = CoverageData(basename=path, read_only=True)
                written.read()
                data.update(written)
            except Exception as exc:  # noqa: BLE001 - one unreadable file costs only its own lines
                problems.append(PARTLY_LOST.format(path=os.path.basename(path), detail=f"{type(exc).__name__}: {exc}"))
        dumped = base64.b64encode(data.dumps()).decode("ascii") if data else None
        return {"data": dumped, "problems": problems}

    def apply(self, item: pytest.Item, value: Any) -> None:
        if not isinstance(value, dict):
            raise TypeError(f"expected a dict, got {type(value).__name__}")
        cov = _running()
        data = _data_of(cov) if cov is not None else None
        if data is not None:
            self._redirect_subprocesses(data.base_filename())  # for the next tests' C (a cache)
        dumped = value.get("data")
        if cov is not None and dumped is not None:
            from coverage import CoverageData

            if not isinstance(dumped, str):
                raise TypeError(f"expected base64 text, got {type(dumped).__name__}")
            carried = CoverageData(no_disk=True)
            carried.loads(base64.b64decode(dumped, validate=True))
            if data is None:
                raise RuntimeError("the running Coverage has no data to merge into")
            data.update(carried)
        problems = value.get("problems") or []
        if problems:
            raise RuntimeError("; ".join(str(p) for p in problems))

    def missing(self, item: pytest.Item) -> str | None:
        """In P, when the test ran but C carried nothing back: what was lost, if anything."""
        return LOST if _running() is not None else None
