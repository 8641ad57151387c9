"""pytest hooks only: options, the marker, and taking over the protocol of sandboxed tests."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Final

import pytest

from . import kept, probe, reports, reruns, runtest, services, timers
from .box import subids
from .budget import MemoryLedger, default_ledger_dir, promised
from .errors import NsboxError
from .prepare import memory_available, memory_total
from .spec import DROP_ENV_INI, OPTION_FIELDS, defaults_from, describe_defaults, format_size, parse_size, with_drop_env

RUNNER_KEY: Final = pytest.StashKey["runtest.SandboxRunner"]()
CGROUP_ROOT_ENV: Final = probe.CGROUP_ROOT_ENV
MEMORY_SUMMARY_TITLE: Final = "nsbox: peak memory of sandboxed tests"
DEFAULTS_OFF_NOTICE: Final = (
    "nsbox: no cgroup could be had for sandboxed tests: {reason}. So {off} {verb} off; `nsbox doctor` says how to get {them}"
)
DEFAULTS_OFF_KEY: Final = "nsbox_defaults_off"  # in an xdist worker's workeroutput
_peaks: dict[str, tuple[int, int | None]] = {}  # nodeid: (peak, limit) of this session; a rerun's highest
_waits: dict[str, float] = {}  # nodeid: seconds the test waited for the memory budget (also from xdist workers)
BUDGET_SUMMARY: Final = (
    "nsbox: {count} sandboxed test(s) waited for the memory budget: {total:.1f}s in total, longest {longest:.1f}s ({nodeid})"
)
_defaults_off: dict[str, str] = {}  # what xdist workers' sandboxed tests went without: reason
_kept: dict[str, str] = {}  # nodeid: the command that re-enters its kept sandbox (also from xdist workers)
MARKER_HELP: Final = (
    "nsbox(image='host', *, memory=None, pids=None, cpus=None, timeout=None, network='none', disk=None, "
    "expect_limits=(), drop_env=None): "
    "run the test in fresh Linux namespaces over a throwaway overlay of the root filesystem image "
    "(see pytest_nsbox.nsbox). Limits default to --nsbox-LIMIT, then ini nsbox_LIMIT; "
    "memory/pids/cpus/timeout=None or 0 turns such a default off for the test. "
    "expect_limits='memory', 'pids', 'disk' or a tuple of them: hitting that limit (a process the test "
    "starts OOM-killed, forks refused, ENOSPC) does not fail the test by itself. "
    "drop_env=['*_TOKEN', ...]: environment variables the test does not get (over ini nsbox_drop_env)."
)
HEADER: Final = "nsbox: {user}, {build}, {cgroup}; defaults: {defaults}"
OPTION_HELP: Final = {
    "--nsbox-image": "default image of sandboxed tests (over ini nsbox_image): 'host', a recipe name, a rootfs dir, oci:...",
    "--nsbox-memory": "default memory limit of sandboxed tests, e.g. 256M (over ini nsbox_memory; 0: none)",
    "--nsbox-pids": "default process limit of sandboxed tests (over ini nsbox_pids; 0: the safety cap of 1024)",
    "--nsbox-cpus": "default CPU bandwidth of sandboxed tests, e.g. 0.5 (over ini nsbox_cpus; 0: none)",
    "--nsbox-timeout": "default wall-clock timeout in seconds of sandboxed tests (over ini nsbox_timeout; 0: none)",
    "--nsbox-disk": "bound on what each sandboxed test writes, e.g. 1G (over ini nsbox_disk; 0: the built-in bound)",
    "--nsbox-scratch": "where sandboxed tests write: 'memory' (a tmpfs, the default) or 'disk' (a directory on the host's disk; "
    "over ini nsbox_scratch)",
}


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nsbox", "sandboxed tests (pytest-nsbox)")
    group.addoption(
        "--nsbox-all", action="store_true", default=False, help="sandbox every test with the defaults (command line, ini)."
    )
    for option, name in OPTION_FIELDS.items():
        metavar = {
            "image": "IMAGE",
            "memory": "SIZE",
            "pids": "N",
            "cpus": "CPUS",
            "timeout": "SECONDS",
            "disk": "SIZE",
            "scratch": "WHERE",
        }[name]
        group.addoption(option, default=None, metavar=metavar, dest=f"nsbox_default_{name}", help=OPTION_HELP[option])
    group.addoption(
        "--nsbox-require",
        action="store_true",
        default=False,
        help="a sandbox that cannot be built is an ERROR, not a SKIP.",
    )
    parser.addini(
        "nsbox_image",
        "default image of sandboxed tests: 'host', a recipe name, a rootfs directory, or oci:/oci-archive:/docker-archive:",
        default="",
    )
    parser.addini("nsbox_memory", "default memory limit of sandboxed tests, e.g. 256M", default="")
    parser.addini("nsbox_pids", "default process limit of sandboxed tests", default="")
    parser.addini("nsbox_cpus", "default CPU bandwidth of sandboxed tests, e.g. 0.5 (half a CPU)", default="")
    parser.addini("nsbox_timeout", "default wall-clock timeout (seconds) of sandboxed tests", default="")
    parser.addini(
        "nsbox_disk",
        "bound on what each sandboxed test writes (writable layer, /tmp, /run, /dev/shm together), e.g. 1G "
        "(default: half the memory available at the start of the run, shared by the xdist workers)",
        default="",
    )
    parser.addini(
        "nsbox_scratch",
        "where sandboxed tests write: 'memory' (a tmpfs, charged to the memory limit; default) or 'disk' "
        "(a directory on the host's disk, in $TMPDIR or /var/tmp)",
        default="",
    )
    parser.addini(
        "nsbox_cgroup_root",
        "where sandbox cgroups go: v1, a directory name in each controller's hierarchy (default pytest-nsbox); "
        "v2, a path below /sys/fs/cgroup (default: beside pytest's own cgroup)",
        default="",
    )
    parser.addini(
        DROP_ENV_INI,
        "environment variables sandboxed tests do not get: fnmatch patterns of names, one a line, e.g. *_TOKEN (default: none)",
        type="linelist",
        default=[],
    )
    parser.addini("nsbox_image_dirs", "more folders of image recipes (<name>/image.toml)", type="linelist", default=[])
    parser.addini(
        "nsbox_prebuild",
        "build the next test's sandbox in a helper process while the current test runs (default true; "
        "false: each sandbox is built by a fork of pytest when its test starts)",
        type="bool",
        default=True,
    )
    parser.addini("nsbox_cache_dir", "where imported image layers are cached (default $XDG_CACHE_HOME/pytest-nsbox)", default="")
    group.addoption(
        "--nsbox-leaks",
        default=None,
        choices=(reports.LEAKS_WARN, reports.LEAKS_FAIL),
        help="processes a sandboxed test left running (they are killed either way): a warning and a report "
        "section (warn, the default), or the test fails (fail). Over ini nsbox_leaks.",
    )
    parser.addini("nsbox_leaks", "processes a sandboxed test left running: warn (default) or fail", default="")
    group.addoption(
        "--nsbox-keep",
        default=None,
        choices=kept.KEEP_MODES,
        help="keep the writable layers of sandboxed tests that failed (failed), of every one (all) or none (none, the "
        "default), report what each changed, and print how to re-enter it (nsbox shell --kept NODEID). Over ini nsbox_keep.",
    )
    group.addoption(
        "--nsbox-keep-runs",
        default=None,
        metavar="N",
        help=f"kept runs of this project to keep, newest first (over ini {kept.KEEP_RUNS_INI}; default {kept.DEFAULT_KEEP_RUNS})",
    )
    group.addoption(
        "--nsbox-keep-size",
        default=None,
        metavar="SIZE",
        help=f"bound on the kept layers of this project, e.g. 2G (over ini {kept.KEEP_SIZE_INI}; default 2G)",
    )
    parser.addini(kept.KEEP_INI, "keep the writable layers of sandboxed tests: failed, all or none (default)", default="")
    parser.addini(kept.KEEP_RUNS_INI, f"kept runs of this project to keep (default {kept.DEFAULT_KEEP_RUNS})", default="")
    parser.addini(kept.KEEP_SIZE_INI, "bound on the kept layers of this project (default 2G)", default="")
    group.addoption(
        "--nsbox-memory-budget",
        default=None,
        metavar="SIZE",
        help="sandboxes with a memory limit start only while their limits fit in SIZE, shared by the xdist workers and "
        "your other runs (over ini nsbox_memory_budget; default: the memory available at the start; 0: no budget).",
    )
    parser.addini(
        "nsbox_memory_budget",
        "memory budget of sandboxes with a memory limit, shared by xdist workers and concurrent runs (0: none)",
        default="",
    )
    group.addoption(
        "--nsbox-memory-report",
        type=int,
        default=10,
        metavar="N",
        help="list the N sandboxed tests with the highest peak memory at the end (0: none; default 10).",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    try:
        options = {option: config.getoption(f"nsbox_default_{name}") for option, name in OPTION_FIELDS.items()}
        defaults = defaults_from(lambda name: str(config.getini(name)), options)
        defaults = with_drop_env(defaults, list(config.getini(DROP_ENV_INI)))
    except NsboxError as exc:
        raise pytest.UsageError(f"pytest-nsbox: {exc}") from None
    try:
        budget = memory_budget(config)
        keep = keep_settings(config)
    except (NsboxError, kept.KeepError) as exc:
        raise pytest.UsageError(f"pytest-nsbox: {exc}") from None
    keeper = None
    if keep.active:
        from .project import cache_dir_setting

        cache_dir = cache_dir_setting(str(config.getini("nsbox_cache_dir")), config.rootpath)
        run_id = getattr(config, "workerinput", {}).get("testrunuid")  # an xdist worker: the run's id
        keeper = kept.Keeper(keep, cache_dir, config.rootpath, nsbox_command(), run_id)
    runner = runtest.SandboxRunner(
        config,
        defaults,
        sandbox_all=bool(config.getoption("nsbox_all")),
        require=bool(config.getoption("nsbox_require")),
        cgroup_root=probe.cgroup_root_setting(str(config.getini(probe.CGROUP_ROOT_INI)))[0],
        cache_dir=str(config.getini("nsbox_cache_dir")),
        prebuild_ahead=bool(config.getini("nsbox_prebuild")),
        budget=budget,
        leaks=leaks_setting(config),
        keeper=keeper,
    )
    config.stash[RUNNER_KEY] = runner
    if keep.active and not config.pluginmanager.has_plugin("nsbox-kept-summary"):
        config.pluginmanager.register(KeptSummary(), "nsbox-kept-summary")
    _peaks.clear()
    _waits.clear()
    _defaults_off.clear()
    _kept.clear()
    if config.pluginmanager.hasplugin(timers.TIMEOUT_PLUGIN):
        hooks = timers.TimeoutPluginHooks(runner.wants, lambda: runtest.child_channel(config))
        config.pluginmanager.register(hooks, "nsbox-timeout-plugin")


class KeptSummary:
    """After the short test summary (pytest prints it last in its own pytest_terminal_summary
    wrapper, this one is outside it): the command that re-enters each kept sandbox."""

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> Generator[None, None, None]:
        try:
            return (yield)
        finally:
            for nodeid, command in sorted(_kept.items()):
                terminalreporter.write_line(f"nsbox: kept {nodeid}: {command}")


def keep_settings(config: pytest.Config) -> kept.KeepSettings:
    """--nsbox-keep, --nsbox-keep-runs, --nsbox-keep-size over their ini keys (KeepError names the source)."""
    values = {
        "mode": (config.getoption("nsbox_keep"), str(config.getini(kept.KEEP_INI))),
        "runs": (config.getoption("nsbox_keep_runs"), str(config.getini(kept.KEEP_RUNS_INI))),
        "size": (config.getoption("nsbox_keep_size"), str(config.getini(kept.KEEP_SIZE_INI))),
    }
    return kept.settings_from(values)


def nsbox_command() -> list[str]:
    """How to run this installation's nsbox command: ``nsbox`` if that is the one on PATH."""
    found = shutil.which("nsbox")
    own = Path(sys.executable).parent / "nsbox"
    if found is not None and own.exists() and os.path.samefile(found, own):
        return ["nsbox"]
    if own.exists():
        return [str(own)]
    return [sys.executable, "-m", "pytest_nsbox"]


def leaks_setting(config: pytest.Config) -> str:
    """--nsbox-leaks over ini nsbox_leaks over warn; a bad ini value is a usage error."""
    option = config.getoption("nsbox_leaks")
    if option is not None:
        return str(option)
    value = str(config.getini("nsbox_leaks")).strip() or reports.LEAKS_WARN
    if value not in (reports.LEAKS_WARN, reports.LEAKS_FAIL):
        raise pytest.UsageError(f"pytest-nsbox: invalid ini nsbox_leaks {value!r} (expected warn or fail)")
    return value


def memory_budget(config: pytest.Config) -> MemoryLedger | None:
    """The run's memory ledger: --nsbox-memory-budget over ini nsbox_memory_budget over the memory
    available now; None when the budget is off ("0", "none", "off")."""
    option = config.getoption("nsbox_memory_budget")
    if option is not None:
        raw, source = str(option), "command line"
    else:
        raw, source = str(config.getini("nsbox_memory_budget")).strip(), "ini"
    if raw.strip().lower() in ("0", "none", "off"):
        return None
    if raw:
        try:
            size = parse_size(raw)
        except ValueError as exc:
            where = "option --nsbox-memory-budget" if source == "command line" else "ini nsbox_memory_budget"
            raise NsboxError(f"invalid memory budget {raw!r} from {where} ({exc})") from None
        return MemoryLedger(default_ledger_dir(), size, source)
    # What is free now, plus what running sandboxes were promised (their use is not free now,
    # and the ledger counts their limits again), never more than the machine has.
    directory = default_ledger_dir()
    total = memory_total()
    return MemoryLedger(directory, min(memory_available() + promised(directory), total), "available at the start")


def pytest_unconfigure(config: pytest.Config) -> None:
    runner = config.stash.get(RUNNER_KEY, None)
    if runner is not None:
        runner.close()


@pytest.hookimpl(tryfirst=True)  # before pytest's tmpdir plugin deletes tmp_path dirs (tmp_path_retention_policy)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Give basetemp's files back to the user (rootless with subordinate ids, see
    Runner.give_back_basetemp). In an xdist worker: hand what sandboxed tests went without to the
    controller, which prints the run's one notice (workers print nothing)."""
    runner = session.config.stash.get(RUNNER_KEY, None)
    if runner is not None:
        runner.give_back_basetemp()
    workeroutput = getattr(session.config, "workeroutput", None)
    if runner is not None and isinstance(workeroutput, dict) and runner.preparer.defaults_off:
        workeroutput[DEFAULTS_OFF_KEY] = dict(runner.preparer.defaults_off)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """In the xdist controller: collect each worker's defaults_off (see pytest_sessionfinish)."""
    off = getattr(node, "workeroutput", {}).get(DEFAULTS_OFF_KEY)
    if isinstance(off, dict):
        for what, reason in off.items():
            _defaults_off.setdefault(str(what), str(reason))


def defaults_off_notice(off: dict[str, str]) -> str:
    """The run's one notice: which defaults sandboxed tests went without, and why."""
    what = sorted(off)  # the pids cap first
    listed = " and ".join(what) if len(what) <= 2 else ", ".join(what[:-1]) + " and " + what[-1]
    verb, them = ("are", "them") if len(what) > 1 else ("is", "it")
    return DEFAULTS_OFF_NOTICE.format(reason=off[what[0]], off=listed, verb=verb, them=them)


def pytest_report_header(config: pytest.Config) -> str | None:
    """One line: root or rootless, prebuilt or forked, the cgroup version, the active defaults."""
    runner = config.stash.get(RUNNER_KEY, None)
    if runner is None:
        return None
    user = "root" if os.getuid() == 0 else "rootless"
    build = "prebuilt" if runner.lookahead.builder is not None else "forked"
    preparer = runner.preparer
    defaults = describe_defaults(preparer.defaults, preparer.default_disk_for(preparer.defaults.spec.scratch))
    header = HEADER.format(user=user, build=build, cgroup=preparer.describe_cgroups(), defaults=defaults)
    if runner.budget is not None:
        header += f"; memory budget {format_size(runner.budget.budget)} ({runner.budget.source})"
    if runner.keeper is not None:
        settings = runner.keeper.settings
        header += f"; keep {settings.mode} (newest {settings.runs} runs, {format_size(settings.size)}: {runner.keeper.project})"
    ids = subids.sandbox_ids()
    if ids.mapping is None:  # what a test cannot do then: README, "What is different inside a sandbox"
        header += "; " + ids.describe()
    return header


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under --collect-only, an invalid nsbox marker is a collection error naming the test and
    the value (a run reports it as the test's ERROR instead, and runs the others)."""
    runner = config.stash.get(RUNNER_KEY, None)
    if runner is None or not config.option.collectonly:
        return
    for item in items:
        if runner.wants(item):
            problem = runner.preparer.check_spec(item)
            if problem is not None:
                report = pytest.CollectReport(item.nodeid, "failed", problem, [])
                config.hook.pytest_collectreport(report=report)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    runner = item.config.stash.get(RUNNER_KEY, None)
    if runner is None or not runner.wants(item):
        return None  # not ours: pytest runs it
    rerun_count = reruns.count(item)
    if rerun_count is not None:  # pytest-rerunfailures' loop, each attempt in a fresh sandbox
        reruns.protocol(item, rerun_count, lambda rerun_follows: runner.run_item(item, nextitem, rerun_follows))
        return True
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in runner.run_item(item, nextitem):
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect peaks and kept sandboxes (also from xdist workers: they travel in user_properties)."""
    properties = dict(report.user_properties)
    command = properties.get(kept.KEPT_COMMAND_PROPERTY)
    if isinstance(command, str):
        _kept[report.nodeid] = command
    if report.when != "teardown":
        return
    waited = properties.get(runtest.BUDGET_WAIT_PROPERTY)
    if isinstance(waited, int | float):
        _waits[report.nodeid] = _waits.get(report.nodeid, 0.0) + float(waited)
    peak = properties.get("nsbox_memory_peak")
    if isinstance(peak, int):
        limit = properties.get("nsbox_memory_limit")
        if peak >= _peaks.get(report.nodeid, (0, None))[0]:
            _peaks[report.nodeid] = (peak, limit if isinstance(limit, int) else None)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    waited = {nodeid: seconds for nodeid, seconds in _waits.items() if seconds > 0}
    if waited:
        longest = max(waited, key=waited.__getitem__)
        terminalreporter.write_line(
            BUDGET_SUMMARY.format(count=len(waited), total=sum(waited.values()), longest=waited[longest], nodeid=longest)
        )
    runner = config.stash.get(RUNNER_KEY, None)
    off = {**(runner.preparer.defaults_off if runner is not None else {}), **_defaults_off}
    if off:
        terminalreporter.write_line(defaults_off_notice(off), yellow=True)
    count = int(config.getoption("nsbox_memory_report") or 0)
    if count <= 0 or not _peaks:
        return
    from .spec import format_size

    terminalreporter.write_sep("=", MEMORY_SUMMARY_TITLE)
    terminalreporter.write_line(f"{'peak':>10}  {'limit':>10}  {'margin':>10}  test")
    for nodeid, (peak, limit) in sorted(_peaks.items(), key=lambda entry: -entry[1][0])[:count]:
        limit_text = format_size(limit) if limit else "-"
        margin = f"{(limit - peak) * 100 / limit:.0f}%" if limit else "-"
        terminalreporter.write_line(f"{format_size(peak):>10}  {limit_text:>10}  {margin:>10}  {nodeid}")


# --- fixtures: the private network (see services.py) ----------------------------------------------


@pytest.fixture(scope="session")
def nsbox_service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.ServiceFactory]:
    """Factory: ``nsbox_service(name, image=..., command=[...], ready_port=PORT, **limits)`` starts a
    service in a sandbox of its own on the private network; it stops at the end of the scope of
    the fixture that started it. Tests with ``network="private"`` reach it as NAME:PORT."""
    runner = request.config.stash[RUNNER_KEY]
    log_dir: list[Path] = []

    def logs() -> Path:
        if not log_dir:
            log_dir.append(tmp_path_factory.mktemp("nsbox-services", numbered=True))
        return log_dir[0]

    started: list[services.Service] = []
    yield services.ServiceFactory(lambda: runner.services, logs, started)
    for service in reversed(started):
        service.stop()


@pytest.fixture(scope="session")
def nsbox_host_ports(request: pytest.FixtureRequest) -> services.HostPorts:
    """``nsbox_host_ports.expose(PORT)``: the host's 127.0.0.1:PORT (a server a wider fixture runs in
    pytest's process) is 127.0.0.1:PORT inside sandboxes on the private network."""
    runner = request.config.stash[RUNNER_KEY]
    return services.HostPorts(lambda: runner.services)


@pytest.fixture
def nsbox_network(request: pytest.FixtureRequest) -> services.TestNetwork:
    """The private network of the current test: ``.partition(name)``, ``.heal()``,
    ``.set_faults(name, delay=..., loss=...)``, ``.services``."""
    return services.network_for_test(request.node.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report shows the logs of the services running while it ran."""
    report = yield
    if report.failed:
        runner = item.config.stash.get(RUNNER_KEY, None)
        registry = runner.services if runner is not None else None
        for name, path in services.logs_for_report(registry, getattr(item, "fixturenames", ())):
            report.sections.append((f"nsbox: service {name} log", services.log_tail(path, 200)))
    return report
