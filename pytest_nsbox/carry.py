"""What a sandboxed test produces besides its reports, carried from the test process (C) to P.

A test's reports cross the fork as records; so does state other tools keep in the test process
and expect in pytest's process when the test is over: coverage data, hypothesis's example
database, junit-xml attributes. Each is a ``Carrier``: in C it notes what it needs before the
protocol (``before``) and collects what the test produced after it (``collect``, a JSON-able
value); in P it applies that value (``apply``). Nothing travels but the value: no writable mount
into the user's tree, and P validates what it applies (the test process is not trusted).

What a test killed by a limit or a signal produced is lost: ``collect`` never runs. A carrier
may say so: if it has a ``missing(item)`` method, P calls it when the test process sent reports
but no record of that carrier, and warns with what it returns (None: nothing was lost).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Final, Protocol

import pytest

from . import compat

RECORD_KIND: Final = "carry"


class Carrier(Protocol):
    """One kind of state carried from C to P (see the module docstring)."""

    name: str

    def active(self, config: pytest.Config) -> bool:
        """In P, once per session: whether there is anything to carry in this run."""

    def before(self, item: pytest.Item) -> None:
        """In C, before the runtest protocol."""

    def collect(self, item: pytest.Item) -> Any:
        """In C, after the runtest protocol: a JSON-able value, or None (nothing to carry)."""

    def apply(self, item: pytest.Item, value: Any) -> None:
        """In P, with what ``collect`` returned; raise on a value it cannot use."""


class FailedSubtests:
    """How many subtests of the test failed: pytest counts them in C, where they run, and fails
    a passing test with failed subtests in P (``contains N failed subtests``)."""

    name = "failed_subtests"

    def active(self, config: pytest.Config) -> bool:
        return config.pluginmanager.has_plugin("subtests")  # its count is set up after this plugin's configure

    def before(self, item: pytest.Item) -> None:
        return None

    def collect(self, item: pytest.Item) -> Any:
        counts = compat.failed_subtests(item.config)
        count = counts.get(compat.item_id(item), 0) if counts is not None else 0
        return count or None

    def apply(self, item: pytest.Item, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"not a count: {value!r}")
        counts = compat.failed_subtests(item.config)
        if counts is not None:
            counts[compat.item_id(item)] += value


class JunitRecords:
    """What the test recorded for junit-xml in C's writer: its testcase's attributes
    (``record_xml_attribute``) and the suite's properties (``record_testsuite_property``).
    ``record_property`` needs no carrier: it travels in the report's user_properties."""

    name = "junit_xml"

    def __init__(self) -> None:
        self._suite_properties_before = 0

    def active(self, config: pytest.Config) -> bool:
        return bool(config.getoption("xmlpath", None)) and not hasattr(config, "workerinput")

    def before(self, item: pytest.Item) -> None:
        xml = compat.junit_xml(item.config)
        self._suite_properties_before = len(xml.global_properties) if xml is not None else 0

    def collect(self, item: pytest.Item) -> Any:
        xml = compat.junit_xml(item.config)
        if xml is None:
            return None
        attributes = dict(xml.node_reporter(compat.item_id(item)).attrs)
        suite_properties = [list(p) for p in xml.global_properties[self._suite_properties_before :]]
        if not attributes and not suite_properties:
            return None
        return {"attributes": attributes, "suite_properties": suite_properties}

    def apply(self, item: pytest.Item, value: Any) -> None:
        xml = compat.junit_xml(item.config)
        if xml is None:
            return
        attributes, suite_properties = value["attributes"], value["suite_properties"]
        if not isinstance(attributes, dict) or not all(isinstance(v, str) for v in attributes.values()):
            raise ValueError(f"not testcase attributes: {attributes!r}")
        if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, str) for v in p) for p in suite_properties):
            raise ValueError(f"not suite properties: {suite_properties!r}")
        reporter = xml.node_reporter(compat.item_id(item))
        for name, text in attributes.items():
            reporter.add_attribute(name, text)
        for name, text in suite_properties:
            xml.add_global_property(name, text)


class TerminalLine:
    """Where the terminal's cursor is after what C wrote on it (live logging, ``log_cli``), so
    that P writes the test's outcome where it would unsandboxed (after a live log, ``PASSED``
    and its progress are aligned on a fresh line)."""

    name = "terminal_line"

    def __init__(self) -> None:
        self._before: tuple[str, object] | None = None

    def active(self, config: pytest.Config) -> bool:
        return True  # the terminal reporter is configured after this plugin: looked up per test

    def before(self, item: pytest.Item) -> None:
        self._before = compat.terminal_line(item.config)

    def collect(self, item: pytest.Item) -> Any:
        now = compat.terminal_line(item.config)
        if now is None or now == self._before:
            return None
        text, fspath = now
        if isinstance(fspath, Path):
            return {"line": text, "path": str(fspath)}
        return {"line": text, "other": fspath if isinstance(fspath, (str, int)) else None}

    def apply(self, item: pytest.Item, value: Any) -> None:
        text = value["line"]
        if not isinstance(text, str):
            raise ValueError(f"not a line: {text!r}")
        fspath = Path(value["path"]) if isinstance(value.get("path"), str) else value.get("other")
        if fspath is not None and not isinstance(fspath, (str, int)) and not isinstance(fspath, Path):
            raise ValueError(f"not a path: {fspath!r}")
        compat.set_terminal_line(item.config, text, fspath)


def all_carriers() -> list[Carrier]:
    """Every carrier pytest-nsbox knows."""
    from .carry_coverage import CoverageCarrier
    from .examples_db import ExampleDatabase
    from .reruns import AttemptState

    return [AttemptState(), FailedSubtests(), JunitRecords(), TerminalLine(), CoverageCarrier(), ExampleDatabase()]


class Carriers:
    """The active carriers of one session."""

    def __init__(self, config: pytest.Config, carriers: list[Carrier] | None = None) -> None:
        self.active = [c for c in (all_carriers() if carriers is None else carriers) if c.active(config)]

    def before(self, item: pytest.Item) -> list[dict[str, Any]]:
        """In C: a record for each carrier that failed (it then carries nothing)."""
        failed = []
        for carrier in list(self.active):
            try:
                carrier.before(item)
            except Exception as exc:  # noqa: BLE001 - the test runs regardless; P says what was lost
                self.active.remove(carrier)
                failed.append({"kind": RECORD_KIND, "name": carrier.name, "error": f"{type(exc).__name__}: {exc}"})
        return failed

    def collect(self, item: pytest.Item) -> list[dict[str, Any]]:
        """In C: one record per carrier with something to carry (or an error)."""
        records = []
        for carrier in self.active:
            try:
                value = carrier.collect(item)
            except Exception as exc:  # noqa: BLE001 - P says what was lost
                records.append({"kind": RECORD_KIND, "name": carrier.name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            if value is not None:
                records.append({"kind": RECORD_KIND, "name": carrier.name, "value": value})
        return records

    def apply(self, item: pytest.Item, records: list[dict[str, Any]]) -> list[str]:
        """In P: apply each carried record; the problems, one line each (never raises)."""
        by_name = {carrier.name: carrier for carrier in self.active}
        problems = []
        carried = set()
        for record in records:
            if record.get("kind") != RECORD_KIND:
                continue
            carried.add(str(record.get("name")))
            carrier = by_name.get(str(record.get("name")))
            if "error" in record:
                problems.append(f"{record.get('name')}: {record['error']}")
                continue
            if carrier is None:
                problems.append(f"unknown carried state {record.get('name')!r}")
                continue
            try:
                carrier.apply(item, record.get("value"))
            except Exception as exc:  # noqa: BLE001 - the value comes from the test process
                problems.append(f"{carrier.name}: {type(exc).__name__}: {exc}")
        if any(record.get("kind") == "report" for record in records):  # the test ran in C
            for carrier in self.active:
                missing = getattr(carrier, "missing", None)  # optional (see the module docstring)
                if carrier.name not in carried and missing is not None and (problem := missing(item)):
                    problems.append(f"{carrier.name}: {problem}")
        return problems


def loaded(module: str) -> Any:
    """*module* if the run imported it already (a carrier never imports what the user did not)."""
    return sys.modules.get(module)
