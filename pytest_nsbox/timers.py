"""Timers other plugins start for a test run in the sandbox, next to the test, not in P.

pytest's ``faulthandler_timeout`` and pytest-timeout arm their timer in pytest's process when a
test's protocol starts. For a sandboxed test that process is P, which only waits for the sandbox:

- faulthandler's watchdog would dump P's stack, and C would inherit the watchdog's armed state
  without its thread (threads do not survive fork): C's ``cancel_dump_traceback_later()``
  (pytest calls it when --pdb or an exception interacts) waits forever for that thread. P
  cancels its watchdog before the fork; C arms one of its own, for the whole timeout.
- pytest-timeout's SIGALRM would interrupt P's wait (an INTERNALERROR), and its thread method
  would ``os._exit`` P. Its ``pytest_timeout_set_timer``/``cancel_timer`` hooks let a plugin take
  the timer over: in P they arm nothing for a sandboxed test; C arms pytest-timeout's own timer
  (either method) around the protocol it runs, so the test fails with pytest-timeout's message
  and stack, or, with the thread method, C exits after printing them (P reports the exit).

Both timers run for what runs in the sandbox: function-scoped fixtures, the test, its teardown.
Wider-scoped fixtures set up in P are not timed (their setup happens before the fork).
"""

from __future__ import annotations

import faulthandler
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, Final

import pytest

from . import compat, reports
from .box.wire import Channel

TIMEOUT_PLUGIN: Final = "timeout"  # pytest-timeout's plugin name
SETTINGS_KEY: Final = pytest.StashKey[Any]()  # pytest-timeout's settings, noted in P, armed in C


# --- faulthandler_timeout ----------------------------------------------------------------------


def faulthandler_timeout(config: pytest.Config) -> float:
    try:
        return float(config.getini("faulthandler_timeout") or 0.0)
    except (ValueError, TypeError):
        return 0.0


def before_fork(item: pytest.Item) -> None:
    """In P: cancel faulthandler's watchdog pytest armed, so C does not inherit it half-alive."""
    if faulthandler_timeout(item.config) > 0:
        faulthandler.cancel_dump_traceback_later()


def arm_in_child(item: pytest.Item) -> None:
    """In C, before the protocol: faulthandler's watchdog (a thread of C's own) and pytest-timeout's
    timer when the whole protocol is timed (func_only: pytest-timeout arms it around the call)."""
    config = item.config
    timeout = faulthandler_timeout(config)
    stderr = compat.faulthandler_stderr(config)
    if timeout > 0 and stderr is not None:
        try:
            exit_on_timeout = bool(config.getini("faulthandler_exit_on_timeout"))
        except ValueError:  # pytest before 9: no such ini key
            exit_on_timeout = False
        faulthandler.dump_traceback_later(timeout, file=stderr, exit=exit_on_timeout)
    settings = item.stash.get(SETTINGS_KEY, None)
    if settings is not None and not settings.func_only:
        config.hook.pytest_timeout_set_timer(item=item, settings=settings)


def disarm_in_child(item: pytest.Item) -> None:
    """In C, after the protocol."""
    if faulthandler_timeout(item.config) > 0:
        faulthandler.cancel_dump_traceback_later()
    settings = item.stash.get(SETTINGS_KEY, None)
    if settings is not None and not settings.func_only:
        item.config.hook.pytest_timeout_cancel_timer(item=item)


# --- pytest-timeout ------------------------------------------------------------------------------


class TimeoutPluginHooks:
    """pytest-timeout's timer hooks (registered when pytest-timeout is active).

    In P, for a sandboxed item: note the settings and arm nothing. In C (and for items P runs
    itself): return None, so pytest-timeout's own implementation arms and cancels its timer.
    """

    def __init__(self, sandboxed: Callable[[pytest.Item], bool], child_channel: Callable[[], Channel | None]) -> None:
        self.sandboxed = sandboxed  # whether P runs the item in a sandbox
        self.child_channel = child_channel  # in C: the channel to P; None in P

    @pytest.hookimpl(optionalhook=True)
    def pytest_timeout_set_timer(self, item: pytest.Item, settings: Any) -> bool | None:
        if self._in_p(item):
            item.stash[SETTINGS_KEY] = settings
            return True
        channel = self.child_channel()
        if channel is not None and settings.method == "thread":
            _arm_reporting_thread(item, settings, channel)
            return True
        return None

    @pytest.hookimpl(optionalhook=True)
    def pytest_timeout_cancel_timer(self, item: pytest.Item) -> bool | None:
        return True if self._in_p(item) else None

    def _in_p(self, item: pytest.Item) -> bool:
        return self.child_channel() is None and self.sandboxed(item)


def _arm_reporting_thread(item: pytest.Item, settings: Any, channel: Channel) -> None:
    """In C: pytest-timeout's thread method, which first sends P its message and the stacks (it
    then prints them and ``os._exit``s C, before the test can report)."""
    pytest_timeout: Any = item.config.pluginmanager.getplugin(TIMEOUT_PLUGIN)  # the module

    def fire() -> None:
        if not settings.disable_debugger_detection and pytest_timeout.is_debugging():
            return
        message = pytest_timeout.PYTEST_FAILURE_MESSAGE % settings.timeout
        channel.send(reports.PLUGIN_TIMEOUT, message=message, stack=_stacks())
        pytest_timeout.timeout_timer(item, settings)

    timer = threading.Timer(settings.timeout, fire)
    timer.name = f"{pytest_timeout.__name__} {item.nodeid}"

    def cancel() -> None:
        timer.cancel()
        timer.join()

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # pytest-timeout's cancel_timer calls it
    timer.start()


def _stacks() -> str:
    """The stack of every thread but the caller's (the timer's)."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        if ident != threading.get_ident():
            out.append(f"Stack of {names.get(ident, '<unknown>')} ({ident}):\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(out)
