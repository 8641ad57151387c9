"""Every use of pytest's private API, in one place: the risk on each pytest upgrade.

Splitting one item's protocol across a fork needs what pytest keeps to itself: the setup
state's stack (wider-scoped fixtures are set up in P, the item in C), fixture scopes, the
runtest protocol without logging, the xfail evaluation, basetemp, and a skip located at the
item. CI runs the suite on the oldest pytest pyproject.toml admits and on the newest.
"""

from __future__ import annotations

from typing import Any

import pytest
from _pytest.runner import runtestprotocol


def setup_wider_fixtures(item: pytest.Item) -> None:
    """In P: set up the item's collectors and every fixture wider than function scope."""
    state = item.session._setupstate
    if item.parent is not None:
        state.setup(item.parent)  # type: ignore[arg-type]
    request = getattr(item, "_request", None)
    fixtureinfo = getattr(item, "_fixtureinfo", None)
    if request is None or fixtureinfo is None:
        return  # not a Function item: nothing but collectors to prepare
    if not request:
        item._initrequest()  # type: ignore[attr-defined]
        request = item._request  # type: ignore[attr-defined]
    callspec = getattr(item, "callspec", None)
    # The item is on the stack while its wider fixtures are requested (pytest checks it is
    # active), but it is not set up here: C does that.
    state.stack[item] = ([], None)
    try:
        for name in item.fixturenames:  # type: ignore[attr-defined]
            defs = fixtureinfo.name2fixturedefs.get(name)
            if not defs:
                continue
            scope = defs[-1]._scope
            if callspec is not None and name in callspec.params:
                scope = callspec._arg2scope[name]
            if scope.name == "Function":
                continue
            if scope.name == "Class" and item.getparent(pytest.Class) is None:
                continue  # pytest falls back to the item itself: function scope in effect
            request.getfixturevalue(name)
    finally:
        state.stack.pop(item, None)


def teardown_towards(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """In P: tear down what *nextitem* does not need (pytest's own teardown_exact), then drop the
    item's fixture request as pytest's runner does after teardown."""
    try:
        item.session._setupstate.teardown_exact(nextitem)
    finally:
        drop_request(item)


def drop_request(item: pytest.Item) -> None:
    """In P: drop the item's fixture request (its wider fixtures stay up: a rerun follows)."""
    if hasattr(item, "_request"):
        item._request = False  # type: ignore[attr-defined]
        item.funcargs = None  # type: ignore[attr-defined]


def run_protocol(item: pytest.Item) -> None:
    """In C: pytest's runtest protocol for the item, without logging (P logs the reports).

    ``nextitem=item.parent`` tears down the item only: P owns the wider fixtures.
    """
    runtestprotocol(item, log=False, nextitem=item.parent)  # type: ignore[arg-type]


def evaluate_xfail(item: pytest.Item) -> None:
    """Give pytest's xfail logic in P what it computed in C (a crash of an xfail test is XFAIL)."""
    try:
        from _pytest.skipping import evaluate_xfail_marks, xfailed_key
    except ImportError:  # pragma: no cover - private API moved
        return
    if item.stash.get(xfailed_key, None) is None:
        try:
            item.stash[xfailed_key] = evaluate_xfail_marks(item)
        except Exception:  # noqa: BLE001 - a broken condition was reported in C already
            pass


def skip_at_item(message: str) -> BaseException:
    """A skip exception reported at the test's location (like a skip marker), not at our code."""
    return pytest.skip.Exception(message, _use_item_location=True)


def basetemp(config: pytest.Config) -> str | None:
    """pytest's basetemp (tmp_path's parent), if the tmpdir plugin is active."""
    factory = getattr(config, "_tmp_path_factory", None)
    return str(factory.getbasetemp()) if factory is not None else None


def captured_so_far(config: pytest.Config) -> tuple[str, str] | None:
    """What the test wrote to pytest's global capture (stdout, stderr) so far, if capturing."""
    capman: Any = config.pluginmanager.getplugin("capturemanager")
    if capman is None or not capman.is_globally_capturing():
        return None
    try:
        out, err = capman.read_global_capture()
    except Exception:  # noqa: BLE001 - the capture files belong to a process that died
        return None
    return str(out), str(err)
