"""pytest hooks only: options, the marker, and taking over the protocol of sandboxed tests."""

from __future__ import annotations

from collections.abc import Generator
from typing import Final

import pytest

from . import runtest
from .spec import SpecError, defaults_from_ini

RUNNER_KEY: Final = pytest.StashKey["runtest.SandboxRunner"]()
MARKER_HELP: Final = (
    "nsbox(image='host', *, memory=None, pids=None, cpus=None, timeout=None, network='none'): "
    "run the test in fresh Linux namespaces over a throwaway overlay of the root filesystem image "
    "(see pytest_nsbox.nsbox)."
)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nsbox", "sandboxed tests (pytest-nsbox)")
    group.addoption("--nsbox-all", action="store_true", default=False, help="sandbox every test with the ini defaults.")
    group.addoption(
        "--nsbox-require",
        action="store_true",
        default=False,
        help="a sandbox that cannot be built is an ERROR, not a SKIP.",
    )
    parser.addini("nsbox_image", "default image of sandboxed tests ('host', or a rootfs directory)", default="")
    parser.addini("nsbox_memory", "default memory limit of sandboxed tests, e.g. 256M", default="")
    parser.addini("nsbox_pids", "default process limit of sandboxed tests", default="")
    parser.addini("nsbox_timeout", "default wall-clock timeout (seconds) of sandboxed tests", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    try:
        defaults = defaults_from_ini(lambda name: str(config.getini(name)))
    except SpecError as exc:
        raise pytest.UsageError(f"pytest-nsbox: {exc}") from None
    runner = runtest.SandboxRunner(
        config, defaults, sandbox_all=bool(config.getoption("nsbox_all")), require=bool(config.getoption("nsbox_require"))
    )
    config.stash[RUNNER_KEY] = runner
    config.pluginmanager.register(_ChildReporter(config), "nsbox-child-reporter")


def pytest_unconfigure(config: pytest.Config) -> None:
    runner = config.stash.get(RUNNER_KEY, None)
    if runner is not None:
        runner.close()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    runner = item.config.stash.get(RUNNER_KEY, None)
    if runner is None or not runner.wants(item):
        return None  # not ours: pytest runs it
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in runner.run_item(item, nextitem):
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


class _ChildReporter:
    """In C, sends each finished report to P. Outermost wrapper: it sees the final report."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        runtest.send_report(self.config, report)
        return report
