"""What a sandboxed test produces besides its reports, carried from the test process (C) to P.

A test's reports cross the fork as records; so does state other tools keep in the test process
and expect in pytest's process when the test is over: coverage data, hypothesis's example
database, junit-xml attributes. Each is a ``Carrier``: in C it notes what it needs before the
protocol (``before``) and collects what the test produced after it (``collect``, a JSON-able
value); in P it applies that value (``apply``). Nothing travels but the value: no writable mount
into the user's tree, and P validates what it applies (the test process is not trusted).

What a test killed by a limit or a signal produced is lost: ``collect`` never runs.
"""

from __future__ import annotations

import sys
from typing import Any, Final, Protocol

import pytest

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


def all_carriers() -> list[Carrier]:
    """Every carrier pytest-nsbox knows."""
    from .examples_db import ExampleDatabase
    from .reruns import AttemptState

    return [AttemptState(), ExampleDatabase()]


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
        for record in records:
            if record.get("kind") != RECORD_KIND:
                continue
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
        return problems


def loaded(module: str) -> Any:
    """*module* if the run imported it already (a carrier never imports what the user did not)."""
    return sys.modules.get(module)
