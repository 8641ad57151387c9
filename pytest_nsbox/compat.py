"""Every use of pytest's private API, in one place: the risk on each pytest upgrade.

Splitting one item's protocol across a fork needs what pytest keeps to itself: the setup
state's stack (wider-scoped fixtures are set up in P, the item in C), fixture scopes, the
runtest protocol without logging, the xfail evaluation, basetemp, and a skip located at the
item. CI runs the suite on the oldest pytest pyproject.toml admits and on the newest. The
``nsbox`` command finds the project's ini file with pytest's own search (``project_ini``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
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
    """In C: pytest's runtest protocol for the item, logging its reports as pytest does (the
    child reporter sends them to P; ``log_only_to`` keeps C's presenters out).

    ``nextitem=item.parent`` tears down the item only: P owns the wider fixtures.
    """
    runtestprotocol(item, log=True, nextitem=item.parent)  # type: ignore[arg-type]


def own_no_wider_fixtures(item: pytest.Item) -> None:
    """In C: forget the finalizers of the collectors P set up (the session, module, class
    fixtures): P tears them down. Even when C's session is told to stop (``-x`` after a failed
    subtest), C's teardown then never finalizes a fixture P still holds."""
    stack = item.session._setupstate.stack
    for node, (_finalizers, error) in list(stack.items()):
        stack[node] = ([], error)


def log_only_to(config: pytest.Config, keep: tuple[object, ...]) -> None:
    """In C: ``pytest_runtest_logreport`` reaches only the plugins in *keep*.

    Every report logged in C is logged again in P, where the terminal, junit-xml, xdist's
    worker channel (closed in C) and any other presenter see it; in C they would print it,
    write it to a log, or fail. Replaces the hook caller on the config's hook relay with
    pluggy's subset caller (hook proxies of conftest directories derive from it).
    """
    pm = config.pluginmanager
    others = [impl.plugin for impl in pm.hook.pytest_runtest_logreport.get_hookimpls() if impl.plugin not in keep]
    caller = pm.subset_hook_caller("pytest_runtest_logreport", others)
    setattr(pm.hook, "pytest_runtest_logreport", caller)  # noqa: B010
    if config.hook is not pm.hook:  # pytest < 8.1: a proxy that cached the caller P used (PathAwareHookProxy)
        setattr(config.hook, "pytest_runtest_logreport", caller)  # noqa: B010


def report_from_serializable(config: pytest.Config, data: dict[str, Any]) -> pytest.TestReport:
    """In P: a report of the sandbox from its serialized form, as the object it was in C.

    pytest's subtest report quotes its context's values again when it is rebuilt (``i=1``
    becomes ``i='1'``, as it does under xdist); the values C sent are kept instead.
    """
    report: pytest.TestReport = config.hook.pytest_report_from_serializable(config=config, data=data)
    context = getattr(report, "context", None)
    sent = data.get("_subtest.context")
    if context is not None and isinstance(sent, dict) and isinstance(sent.get("kwargs"), dict):
        try:
            object.__setattr__(context, "kwargs", dict(sent["kwargs"]))
        except (AttributeError, TypeError):  # pragma: no cover - the class changed
            pass
    return report


def failed_subtests(config: pytest.Config) -> Any:
    """pytest's count of failed subtests per test id (a defaultdict), or None (no built-in subtests).

    pytest counts them where the subtest ends (in C) and reads the count when it decides the
    outcome of the test's call report (in P's terminal reporter).
    """
    try:
        from _pytest.subtests import failed_subtests_key
    except ImportError:  # pytest < 9: no built-in subtests
        return None
    return config.stash.get(failed_subtests_key, None)


def item_id(item: pytest.Item) -> Any:
    """The key pytest's subtests count failures under for *item*."""
    return getattr(item, "id", item.nodeid)


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


def basetemp_if_made(config: pytest.Config) -> str | None:
    """pytest's basetemp if it was made in this process (never makes one)."""
    factory = getattr(config, "_tmp_path_factory", None)
    made = getattr(factory, "_basetemp", None)
    return str(made) if made is not None else None


def stdio_copies(config: pytest.Config) -> tuple[int, ...]:
    """The descriptors pytest holds of the user's stdin/stdout/stderr: the originals its global
    capture saved (fd method) and faulthandler's copy of stderr. The debugger, pytest-timeout's
    dump and faulthandler's write there, past the capture."""
    fds: list[int] = []
    capman: Any = config.pluginmanager.getplugin("capturemanager")
    capturing = getattr(capman, "_global_capturing", None)
    for name in ("in_", "out", "err"):
        saved = getattr(getattr(capturing, name, None), "targetfd_save", None)
        if isinstance(saved, int):
            fds.append(saved)
    stderr_copy = faulthandler_stderr(config)
    if stderr_copy is not None:
        fds.append(stderr_copy)
    return tuple(fds)


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


def pdb_shown(report: pytest.TestReport) -> bool:
    """Whether pytest's --pdb showed this failure already (the terminal's FAILURES section skips it)."""
    return bool(getattr(report, "_pdbshown", False))


def mark_pdb_shown(report: pytest.TestReport) -> None:
    report._pdbshown = True  # type: ignore[attr-defined]


def faulthandler_stderr(config: pytest.Config) -> int | None:
    """The copy of stderr pytest's faulthandler plugin writes its dumps to (None: plugin off)."""
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key
    except ImportError:  # pragma: no cover - private API moved
        return None
    fd = config.stash.get(fault_handler_stderr_fd_key, None)
    return fd if isinstance(fd, int) else None


def junit_xml(config: pytest.Config) -> Any:
    """pytest's junit-xml writer (LogXML) of this process, or None (no --junitxml, an xdist worker)."""
    try:
        from _pytest.junitxml import xml_key
    except ImportError:  # pragma: no cover - private API moved
        return None
    return config.stash.get(xml_key, None)


def terminal_line(config: pytest.Config) -> tuple[str, object] | None:
    """What the terminal reporter knows of the terminal's current line: its text so far, and
    the file or test its results are written after (None: no terminal reporter)."""
    reporter: Any = config.pluginmanager.getplugin("terminalreporter")
    if reporter is None:
        return None
    return str(getattr(reporter._tw, "_current_line", "")), reporter.currentfspath


def set_terminal_line(config: pytest.Config, text: str, currentfspath: object) -> None:
    """Tell P's terminal reporter what C wrote on the terminal (live logging) last."""
    reporter: Any = config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        reporter._tw._current_line = text
        reporter.currentfspath = currentfspath


def project_ini(directory: Path) -> tuple[Path | None, dict[str, object]]:
    """The ini file pytest would use when run in *directory* with no arguments (pytest.ini,
    pyproject.toml, tox.ini, setup.cfg, ... in it or a parent), and its values: a string or a
    list of strings each (native types from a TOML-mode file)."""
    from _pytest.config import findpaths

    if "invocation_dir" in inspect.signature(findpaths.locate_config).parameters:  # pytest >= 8.1
        found = findpaths.locate_config(directory, [directory])
    else:
        found = findpaths.locate_config([directory])  # type: ignore[call-arg,arg-type]
    inifile, values = found[1], found[2]
    return inifile, {name: getattr(value, "value", value) for name, value in values.items()}
