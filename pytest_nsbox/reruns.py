"""pytest-rerunfailures with sandboxed tests: every use of its private API, in one place.

rerunfailures reruns a failed test from its own ``pytest_runtest_protocol``, which pytest-nsbox
takes over for a sandboxed test. So for a sandboxed test that rerunfailures would rerun,
``protocol`` runs rerunfailures' loop with rerunfailures' own functions (count, delay, backoff,
``--only-rerun``/``--rerun-except``, the marker's ``condition``, ``--max-suite-reruns``, the xdist
status database), each attempt in a fresh sandbox, and logs the reports exactly as rerunfailures
does: an ``R`` per rerun, ``N rerun`` in the summary, ``report.rerun`` numbering the attempt.

rerunfailures keeps its bookkeeping on the item, written by its makereport wrapper: in C for the
reports the test makes, in P for those P makes itself (a crash, a timeout, a limit). P starts each
attempt's bookkeeping (``start_attempt``: without it rerunfailures' wrapper fails on P's reports,
even without ``--reruns``); ``AttemptState`` carries C's part to P. The exceptions behind C's
reports stay in C: the ``--only-rerun`` match and the marker's ``condition`` are evaluated there.

Wider-scoped fixtures live in P and stay up while a rerun follows (rerunfailures suspends their
finalizers for the same reason); they are torn down after the last attempt.

Checked against pytest-rerunfailures 16.7 (pyproject.toml's compat extra, tests/compat).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, Final

import pytest

PLUGIN_NAME: Final = "rerunfailures"
PHASES: Final = ("setup", "call", "teardown")
# The item attributes rerunfailures' makereport wrapper keeps per attempt (dicts keyed by phase).
_PHASE_FLAGS: Final = {"failed": "_test_failed_statuses", "terminal": "_terminal_errors", "xfailed": "_test_xfailed"}
_EXCINFOS: Final = "_rerun_condition_excinfos"
_CONDITIONS: Final = "_rerun_condition_results"

# One attempt: given "does a rerun follow these reports?" (asked before P tears down the wider
# scopes), the attempt's reports in order.
Attempt = Callable[[Callable[[list[pytest.TestReport]], bool]], Iterable[pytest.TestReport]]


def _plugin(config: pytest.Config) -> Any:
    """rerunfailures' module, if it is installed and not disabled (``-p no:rerunfailures``)."""
    plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
    return plugin if isinstance(plugin, ModuleType) and hasattr(plugin, "get_reruns_count") else None


def count(item: pytest.Item) -> int | None:
    """How often rerunfailures would rerun *item*; None: it would not take the item at all."""
    plugin = _plugin(item.config)
    if plugin is None or plugin._is_rerun_path_excluded(item):
        return None
    reruns = plugin.get_reruns_count(item)
    return None if reruns is None else int(reruns)


def start_attempt(item: pytest.Item) -> None:
    """In P, before an attempt: fresh bookkeeping, as rerunfailures' wrapper starts it at setup."""
    if _plugin(item.config) is None:
        return
    for attribute in (*_PHASE_FLAGS.values(), _EXCINFOS, _CONDITIONS):
        setattr(item, attribute, {})


class AttemptState:
    """Carries rerunfailures' bookkeeping of one attempt from C to P (see the module docstring)."""

    name = "rerunfailures"

    def active(self, config: pytest.Config) -> bool:
        return _plugin(config) is not None

    def before(self, item: pytest.Item) -> None:
        pass

    def collect(self, item: pytest.Item) -> Any:
        plugin = _plugin(item.config)
        if plugin is None or not hasattr(item, _CONDITIONS):
            return None
        # Evaluate the marker's condition here, where the exceptions are (cached per phase/index).
        plugin.get_reruns_condition(item, plugin._get_reruns_condition_failures(item))
        value: dict[str, Any] = {key: dict(getattr(item, attribute, {})) for key, attribute in _PHASE_FLAGS.items()}
        value["conditions"] = [[phase, index, bool(result)] for (phase, index), result in getattr(item, _CONDITIONS).items()]
        return value

    def apply(self, item: pytest.Item, value: Any) -> None:
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping, got {type(value).__name__}")
        for key, attribute in _PHASE_FLAGS.items():
            flags = value.get(key, {})
            if not isinstance(flags, dict) or not all(p in PHASES and isinstance(f, bool) for p, f in flags.items()):
                raise ValueError(f"{key}: expected {{phase: bool}}, got {flags!r:.200}")
            mine = getattr(item, attribute, None)
            if not isinstance(mine, dict):
                mine = {}
                setattr(item, attribute, mine)
            for phase, flag in flags.items():
                mine[phase] = mine.get(phase, False) or flag
        conditions = value.get("conditions", [])
        if not isinstance(conditions, list):
            raise ValueError(f"conditions: expected a list, got {conditions!r:.200}")
        results = getattr(item, _CONDITIONS, None)
        if not isinstance(results, dict):
            results = {}
            setattr(item, _CONDITIONS, results)
        for entry in conditions:
            if not (
                isinstance(entry, list | tuple)
                and len(entry) == 3
                and entry[0] in (*PHASES, "attempt")
                and isinstance(entry[1], int)
                and isinstance(entry[2], bool)
            ):
                raise ValueError(f"conditions: bad entry {entry!r:.200}")
            results[(entry[0], entry[1])] = entry[2]


def protocol(item: pytest.Item, reruns: int, attempt: Attempt) -> None:
    """rerunfailures' ``pytest_runtest_protocol`` for a sandboxed item: attempts until one needs
    no rerun or the reruns are used up; each attempt's reports logged as rerunfailures logs them."""
    plugin = _plugin(item.config)
    assert plugin is not None
    config = item.config
    if reruns and config.option.usepdb:
        raise pytest.UsageError("--reruns incompatible with --pdb")  # rerunfailures' words
    delay = plugin.get_reruns_delay(item)
    backoff = plugin.get_reruns_delay_backoff_factor(item)
    db = config.failures_db  # type: ignore[attr-defined]
    item.execution_count = db.get_test_failures(item.nodeid)  # type: ignore[attr-defined]
    db.set_test_reruns(item.nodeid, reruns)
    if item.execution_count > reruns and item.execution_count > 0:  # type: ignore[attr-defined]
        return  # under xdist: a worker crashed on this test as often as it may be rerun
    while True:
        item.execution_count += 1  # type: ignore[attr-defined]
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        got: list[pytest.TestReport] = []
        try:
            got.extend(attempt(lambda so_far: _rerun_follows(plugin, item, so_far, reruns)))
        except BaseException:  # pytest.exit or Ctrl-C in the test: log what it reported, then end
            for report in got:
                item.ihook.pytest_runtest_logreport(report=report)
            raise
        rerun = _log_attempt(plugin, item, got, reruns, delay * backoff ** (item.execution_count - 1))  # type: ignore[attr-defined]
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        if not rerun:
            return


def _condition(plugin: Any, item: pytest.Item) -> bool:
    return bool(plugin.get_reruns_condition(item, plugin._get_reruns_condition_failures(item)))


def _held_for_another_phase(plugin: Any, item: pytest.Item, report: pytest.TestReport, condition: bool) -> bool:
    """rerunfailures does not publish a failure the condition did not match when another failed
    phase of the attempt matched it (that phase carries the rerun)."""
    failed_subtests = report.when == "call" and plugin._get_num_failed_subtests(item) > 0
    return condition and not plugin._reruns_condition_matches_phase(item, report.when) and (report.failed or failed_subtests)


def _rerun_follows(plugin: Any, item: pytest.Item, reports: list[pytest.TestReport], reruns: int) -> bool:
    """Whether ``_log_attempt`` will rerun after *reports* (without its side effects)."""
    condition = _condition(plugin, item)
    for report in reports:
        if _held_for_another_phase(plugin, item, report, condition):
            continue
        if not plugin._should_not_rerun(item, report, reruns, condition):
            cap = item.config.option.max_suite_reruns
            return cap is None or item.config.failures_db.get_suite_reruns() < cap  # type: ignore[attr-defined]
    return False


def _log_attempt(plugin: Any, item: pytest.Item, reports: list[pytest.TestReport], reruns: int, delay: float) -> bool:
    """Log one attempt's reports as rerunfailures does; whether a rerun follows."""
    config = item.config
    condition = _condition(plugin, item)
    rerun_triggered = False
    for report in reports:
        report.rerun = item.execution_count - 1  # type: ignore[attr-defined]
        if rerun_triggered:
            if report.failed:
                report.outcome = "rerun"  # type: ignore[assignment]
        elif _held_for_another_phase(plugin, item, report, condition):
            continue
        elif not plugin._should_not_rerun(item, report, reruns, condition):
            cap = config.option.max_suite_reruns
            if cap is None or config.failures_db.try_increment_suite_reruns(cap):  # type: ignore[attr-defined]
                report.outcome = "rerun"  # type: ignore[assignment]
                time.sleep(delay)
                if plugin.is_master(config) or plugin.works_with_current_xdist():
                    item.ihook.pytest_runtest_logreport(report=report)
                _forget_attempt(plugin, item, report)
                rerun_triggered = True
                continue
        item.ihook.pytest_runtest_logreport(report=report)
    for attribute in (_EXCINFOS, _CONDITIONS):
        getattr(item, attribute, {}).clear()  # no tracebacks kept for the session's lifetime
    return rerun_triggered


def _forget_attempt(plugin: Any, item: pytest.Item, report: pytest.TestReport) -> None:
    """What rerunfailures drops before a rerun: failed fixture results, the item's setup state,
    its class instance, and the attempt's failed subtests."""
    plugin._remove_cached_results_from_failed_fixtures(item)
    plugin._remove_failed_setup_state_from_session(item)
    plugin._discard_test_class_instance(item)
    plugin._remove_failed_subtests_from_report(item, report)
    plugin._remove_failed_subtest_reports_from_stats(item.config, item.session, item.nodeid)
