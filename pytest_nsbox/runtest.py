"""Run one pytest item in a sandbox: orchestration only.

Wider-scoped fixtures (class, module, package, session) run in P before the fork, so the test
inherits them and P tears them down at the usual time; function-scoped fixtures, the test and
its teardown run in the sandbox (C). Reports cross the pipe via pytest_report_to_serializable.
While a test runs, the builder builds the next item's sandbox (``Lookahead``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from collections.abc import Callable, Generator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import pytest

from . import compat, kept, probe, reports, reruns, services, timers
from .box import subids
from .box.builder import Builder, BuilderError, Failed
from .box.cgroups import Usage
from .box.config import INTERACTIVE, KILL_GRACE, SandboxConfig, SandboxResult
from .box.mounts import HOSTNAME
from .box.network import NetworkError, NetworkHost
from .box.prebuilt import Prebuilt
from .box.supervise import Supervisor
from .box.wire import Channel
from .budget import Admission, BudgetError, MemoryLedger
from .carry import Carriers
from .errors import NsboxError
from .prepare import MARKER, Prepared, Preparer, Refused
from .services import ServiceRegistry
from .spec import Defaults, format_size, network_mode

log = logging.getLogger(__name__)

CHILD_REPORTER: Final = "nsbox-child-reporter"
USER_NOT_APPLIED: Final = (
    "nsbox: image {image!r} asks for User {user!r}; its sandboxed tests run as root inside (your uid outside): "
    "a test is pytest's own process (the User applies to 'nsbox shell' and recipe run steps)"
)
BASETEMP_NOT_GIVEN_BACK: Final = (
    "nsbox: could not give the files sandboxed tests left in {basetemp} back to you ({error}); "
    "files of subordinate ids there may resist deletion"
)
PIDS_TO_START: Final = 3  # forked form: the unsharer A, PID 1 B and the test C are in the cgroup
START_MEMORY_MARGIN: Final = 2  # the test's own start (pytest's runtest protocol) copies more of P
MIN_START_MEMORY: Final = 16 * 2**20  # when an empty sandbox cannot be measured
BUDGET_WAIT_PROPERTY: Final = "nsbox_budget_wait"  # user_properties: seconds the test waited for the memory budget
NEEDS_BUILDER: Final = services.NO_BUILDER
BUILDER_LOST_NETWORK: Final = "the sandbox builder was lost ({detail}): the private network and its services went with it"
DISK_PROBE: Final = "/dev/shm"  # a directory of the scratch tmpfs in every sandbox (see box.mounts)


def start_memory_floor(cost: int | None) -> int:
    """The smallest memory limit to suggest: twice an empty sandbox's peak, in whole MiB."""
    if cost is None:
        return MIN_START_MEMORY
    mib = 2**20
    return -(-cost * START_MEMORY_MARGIN // mib) * mib


class NsboxWarning(pytest.PytestWarning):
    """Something pytest-nsbox worked around; the tests still ran sandboxed."""


class Lookahead:
    """The builder's pipeline: the next item is prepared, and its sandbox built, while the
    current test runs. A sandbox built for an item that does not run next is discarded.

    In a run of items with one spec (the common case: --nsbox-all, or a module of alike tests)
    the builder works one more item ahead: with the next item's sandbox it builds a spare with
    the same spec, which becomes the sandbox of the item after if that has the same spec too.
    So each sandbox has a whole test's time to be built, and the test never waits for it.
    """

    def __init__(self, preparer: Preparer, builder: Builder | None) -> None:
        self.preparer = preparer
        self.builder = builder
        self._next: tuple[pytest.Item, Prepared | Refused, int | None] | None = None
        self._spare: tuple[Prepared, int | None] | None = None
        self._current: Prepared | Refused | None = None  # what the running item got
        self.lost: BuilderError | None = None  # why the builder is gone, if it is

    def take(self, item: pytest.Item) -> tuple[Prepared | Refused, int | None]:
        """The item's preparation and the builder's ticket for its sandbox (None: none asked)."""
        if self._next is not None:
            next_item, prepared, ticket = self._next
            self._next = None
            if next_item is item:
                self._current = prepared
                return prepared, ticket
            self.discard(prepared, ticket)
        prepared_now = self.preparer.prepare(item)
        assert prepared_now is not None
        self._current = prepared_now
        return prepared_now, None

    def prepare_next(self, nextitem: pytest.Item | None, wanted: bool) -> None:
        """Prepare *nextitem* now and have its sandbox built while the current test runs."""
        if self.builder is None or nextitem is None or not wanted:
            return
        spare, self._spare = self._spare, None
        try:
            prepared = self.preparer.prepare(nextitem, ahead=True, spare=spare[0] if spare else None)
        except Exception:  # noqa: BLE001 - it surfaces again when the item runs
            prepared = None
        ticket = None
        if spare is not None:
            if prepared is spare[0]:
                ticket = spare[1]
            else:
                self.discard(*spare)
        if prepared is None:
            return
        if isinstance(prepared, Prepared):
            if ticket is None:
                ticket = self.submit(prepared)
            current = self._current
            if isinstance(current, Prepared) and current.spec == prepared.spec:
                self._build_spare(prepared)
        self._next = (nextitem, prepared, ticket)

    def _build_spare(self, like: Prepared) -> None:
        spare = self.preparer.another(like)
        if spare is not None:
            self._spare = (spare, self.submit(spare))

    def submit(self, prepared: Prepared) -> int | None:
        """Have the builder build *prepared*'s sandbox; None: it is built when the test starts."""
        if self.builder is None:
            return None
        try:
            return self.builder.submit(prepared.config(), prepared.plumbing())
        except BuilderError as exc:
            self._lost(exc)
            return None
        except NetworkError:
            return None  # the test fails closed when it starts (SandboxRunner._run)

    def built(self, ticket: int | None) -> Prebuilt | Failed | None:
        """The sandbox of *ticket*; None: build it now, by forks of P."""
        if ticket is None or self.builder is None:
            return None
        try:
            built = self.builder.take(ticket)
        except BuilderError as exc:
            self._lost(exc)
            return None
        if isinstance(built, Prebuilt) and built.exited():
            built.close()  # killed from outside, or with the builder (PR_SET_PDEATHSIG): build anew
            if not self.builder.alive():
                self._lost(BuilderError("the sandbox builder died"))
            return None
        return built

    def discard(self, prepared: Prepared | Refused, ticket: int | None) -> None:
        """Kill a sandbox built for an item that did not run; release its cgroup."""
        answer = self.built(ticket)
        if isinstance(answer, Prebuilt):
            answer.kill()
            answer.exited(timeout=KILL_GRACE)
            answer.close()
        if isinstance(prepared, Prepared):
            prepared.discard()

    def close(self) -> None:
        if self._next is not None:
            self.discard(*self._next[1:])
            self._next = None
        if self._spare is not None:
            self.discard(*self._spare)
            self._spare = None
        if self.builder is not None:
            self.builder.close()

    def _lost(self, exc: BuilderError) -> None:
        """Go on without the builder: each sandbox is then built by a fork of pytest (slower)."""
        warnings.warn(NsboxWarning(reports.BUILDER_LOST.format(detail=exc)), stacklevel=1)
        self.lost = exc
        builder, self.builder = self.builder, None
        if builder is not None:
            builder.close()


def _network_failed(message: str) -> Failed:
    """The test's sandbox could not be put on the private network: the test fails closed."""
    return Failed({"kind": "setup_error", "process": "P", "step": "connect_network", "errno": None, "message": message})


class SandboxRunner:
    """Per session: which items are sandboxed, and running each one."""

    def __init__(
        self,
        config: pytest.Config,
        defaults: Defaults,
        *,
        sandbox_all: bool,
        require: bool,
        cgroup_root: str = "",
        cache_dir: str = "",
        prebuild_ahead: bool = True,
        budget: MemoryLedger | None = None,
        leaks: str = reports.LEAKS_WARN,
        keeper: kept.Keeper | None = None,
    ) -> None:
        self.config = config
        self.keeper = keeper
        self.budget = budget
        self.leaks = leaks
        self.sandbox_all = sandbox_all
        self.require = require
        self.preparer = Preparer(config, defaults, cgroup_root=cgroup_root, cache_dir=cache_dir)
        builder = Builder(subids.sandbox_ids().mapping) if prebuild_ahead and probe.prebuild_supported() else None
        self.lookahead = Lookahead(self.preparer, builder)
        self.preparer.network = self._network
        self.services = ServiceRegistry(self.preparer, lambda: self.lookahead.builder, budget)
        self.supervisor = Supervisor()
        self.carriers = Carriers(config)
        self.reporter = ChildReporter(config)
        config.pluginmanager.register(self.reporter, CHILD_REPORTER)
        self._start_costs: dict[int, int | None] = {}  # id(plan): peak memory of an empty sandbox
        self._warned_users: set[str] = set()  # images whose User a test does not take: warned once
        self._forked = False  # the current test's sandbox was built by forks of P (never kept)
        self._sandboxed = False  # a sandboxed test ran (see give_back_basetemp)

    def wants(self, item: pytest.Item) -> bool:
        return self.sandbox_all or item.get_closest_marker(MARKER) is not None

    def _network(self) -> NetworkHost:
        builder = self.lookahead.builder
        if builder is None:
            lost = self.lookahead.lost
            raise NetworkError(NEEDS_BUILDER if lost is None else BUILDER_LOST_NETWORK.format(detail=lost))
        return builder.network()

    def _join_private_network(
        self, item: pytest.Item, built: Prebuilt | Failed | None, ticket: int | None
    ) -> tuple[Prebuilt | Failed | None, socket.socket | None]:
        """The sandbox claimed from the private network (and a control connection if the test uses
        nsbox_network), or the setup error the test fails closed with."""
        if isinstance(built, Failed):
            return built, None
        try:
            network = self._network()
            if built is None or ticket is None:  # built by a fork of pytest: no way onto the network
                raise NetworkError(
                    NEEDS_BUILDER if self.lookahead.lost is None else BUILDER_LOST_NETWORK.format(detail=self.lookahead.lost)
                )
            _, control = network.claim(ticket, control="nsbox_network" in getattr(item, "fixturenames", ()))
        except NetworkError as exc:
            if built is not None:
                built.kill()
                built.close()
            return _network_failed(str(exc)), None
        return built, control

    def close(self) -> None:
        self.services.close()
        self.supervisor.close()
        self.lookahead.close()
        self.preparer.close()
        if self.keeper is not None:
            self.keeper.close()

    def give_back_basetemp(self) -> None:
        """Rootless with subordinate ids: give what sandboxed tests left in basetemp owned by
        subordinate ids (a directory a test chowned, files a process started with ``user=``
        created) back to the user, so that pytest's basetemp cleanup, and the user, can delete it.

        One sandbox-like process, mapped as the tests' sandboxes are, chowns the tree to its
        root (the user on disk); modes are kept. Root needs none of it: root can delete anything.
        """
        ids = subids.sandbox_ids()
        basetemp = compat.basetemp_if_made(self.config)
        if ids.mapping is None or not ids.subordinate or basetemp is None or not self._sandboxed:
            return
        try:
            subids.run_mapped(ids.mapping, lambda: subids.chown_tree_to_root(Path(basetemp)))
        except (RuntimeError, OSError) as exc:
            warnings.warn(NsboxWarning(BASETEMP_NOT_GIVEN_BACK.format(basetemp=basetemp, error=exc)), stacklevel=1)

    def run_item(
        self,
        item: pytest.Item,
        nextitem: pytest.Item | None,
        rerun_follows: Callable[[list[pytest.TestReport]], bool] = lambda reports: False,
    ) -> Iterator[pytest.TestReport]:
        """Yield the item's reports in order; raise pytest.exit/KeyboardInterrupt as the test did.

        *rerun_follows* is asked, with the reports before P's teardown, whether the item runs
        again (pytest-rerunfailures): then the wider-scoped fixtures stay up for the rerun.
        """
        reruns.start_attempt(item)
        self._sandboxed = True
        prepared, ticket = self.lookahead.take(item)
        too_big = self._beyond_budget(prepared)
        if too_big is not None:  # the user's value: an ERROR, and nothing of the test runs
            self.lookahead.discard(prepared, ticket)
            prepared, ticket = Refused(too_big, unavailable=False), None
        outcome = reports.SandboxReports()
        before_teardown: list[pytest.TestReport] = []
        if isinstance(prepared, Refused):
            self._prepare_next(nextitem)
            if prepared.unavailable:
                before_teardown.append(reports.unavailable_report(item, prepared.message, require=self.require))
            else:
                before_teardown.append(reports.failure_report(item, "setup", prepared.message))
            yield from before_teardown
        else:
            if ticket is None:
                ticket = self.lookahead.submit(prepared)
            self._warn_user_not_applied(prepared)
            setup = pytest.CallInfo.from_call(lambda: compat.setup_wider_fixtures(item), when="setup")
            admission, unadmitted = self._admit(prepared) if setup.excinfo is None else (None, None)
            if setup.excinfo is not None or unadmitted is not None:
                self.lookahead.discard(prepared, ticket)
                self._prepare_next(nextitem)
                if unadmitted is not None:
                    before_teardown.append(reports.failure_report(item, "setup", unadmitted))
                else:
                    before_teardown.append(item.ihook.pytest_runtest_makereport(item=item, call=setup))
                yield from before_teardown
            else:
                try:
                    result = self._run(item, nextitem, prepared, ticket)
                finally:
                    if admission is not None and self.budget is not None:
                        self.budget.release(admission)
                too_small = self.too_small_to_start(prepared, result)
                for problem in self.carriers.apply(item, result.records):
                    warnings.warn(NsboxWarning(reports.NOT_CARRIED.format(nodeid=item.nodeid, problem=problem)), stacklevel=1)
                item.ihook.pytest_nsbox_sandbox_finished(item=item, spec=prepared.spec, result=result)
                if too_small is not None:  # the user's value, not this host: an ERROR, never a SKIP
                    result = replace(result, records=[])
                try:
                    outcome = reports.from_sandbox(item, prepared.spec, result, require=self.require, leaks=self.leaks)
                except Exception as exc:  # noqa: BLE001 - the records come from the test's process: never the session's end
                    message = reports.CORRUPT_STREAM.format(detail=f"{type(exc).__name__}: {exc}")
                    outcome = reports.SandboxReports([reports.failure_report(item, "setup", message)])
                if admission is not None:
                    for report in outcome.reports:
                        report.user_properties.append((BUDGET_WAIT_PROPERTY, round(admission.waited, 3)))
                if too_small is not None:
                    outcome.reports = [reports.failure_report(item, "setup", too_small)]
                    outcome.others = []
                if self.keeper is not None and result.setup_error is None:  # a sandbox never built: nothing to keep
                    self._keep(item, outcome, forked=self._forked)
                for record in outcome.warnings:
                    replay_warning(record)
                in_sandbox_teardown = outcome.teardown()
                before_teardown = [r for r in outcome.reports if r is not in_sandbox_teardown]
                yield from (r for r in outcome.in_order() if r is not in_sandbox_teardown)
        if outcome.pending is not None:
            raise outcome.pending  # as in pytest: the session's teardown_exact(None) tears down the rest
        in_sandbox = outcome.teardown()
        keep_wider = rerun_follows([*before_teardown, *([in_sandbox] if in_sandbox is not None else [])])
        yield self._teardown_outside(item, nextitem, in_sandbox, keep_wider=keep_wider)

    def _admit(self, prepared: Prepared) -> tuple[Admission | None, str | None]:
        """Wait for the memory budget to admit the sandbox (None: no budget or no memory limit);
        or why it cannot be (the ledger failed: the test is an ERROR, the session goes on)."""
        if self.budget is None or prepared.spec.memory is None:
            return None, None
        try:  # the services the wider fixtures just started hold their share until their scope ends
            self.budget.check(prepared.spec.memory, self.services.held_memory())
        except BudgetError as exc:
            return None, str(exc)
        try:
            return self.budget.admit(prepared.spec.memory), None
        except (BudgetError, OSError) as exc:
            return None, f"nsbox: the memory budget could not admit the sandbox: {exc}"

    def _beyond_budget(self, prepared: Prepared | Refused) -> str | None:
        """Why the test's memory limit can never be admitted (bigger than the whole budget), or None."""
        if self.budget is None or not isinstance(prepared, Prepared) or prepared.spec.memory is None:
            return None
        try:
            self.budget.check(prepared.spec.memory, self.services.held_memory())
        except BudgetError as exc:
            return str(exc)
        return None

    def _warn_user_not_applied(self, prepared: Prepared) -> None:
        """The test process is pytest's: root inside whatever User the image asks for. Say so,
        once per image, rather than fail every test of an image with a USER line."""
        image, user = prepared.spec.image, prepared.image.user if prepared.image is not None else None
        if user is not None and not user.is_root and image not in self._warned_users:
            self._warned_users.add(image)
            warnings.warn(NsboxWarning(USER_NOT_APPLIED.format(image=image, user=user.spec)), stacklevel=1)

    def _run(self, item: pytest.Item, nextitem: pytest.Item | None, prepared: Prepared, ticket: int | None) -> SandboxResult:
        # now: the cwd the wider fixtures left
        config = replace(prepared.config(), stdio_copies=compat.stdio_copies(item.config))
        environment = prepared.environment()
        built = self.lookahead.built(ticket)
        control: socket.socket | None = None
        if network_mode(prepared.spec.network) == "private":
            built, control = self._join_private_network(item, built, ticket)
            config = replace(
                config,
                extra_hosts=self.services.hosts(),
                network_control_fd=control.fileno() if control is not None else None,
            )
        try:
            return self._start_test(item, nextitem, prepared, built, config, environment)
        finally:
            if control is not None:
                control.close()  # N undoes what the test changed when the test's copy is gone too

    def _start_test(
        self,
        item: pytest.Item,
        nextitem: pytest.Item | None,
        prepared: Prepared,
        built: Prebuilt | Failed | None,
        config: SandboxConfig,
        environment: dict[str, str],
    ) -> SandboxResult:
        self._forked = built is None
        if isinstance(built, Failed):
            usage = prepared.cgroup.usage() if prepared.cgroup is not None else Usage()  # was it a limit?
            prepared.discard()  # its processes are exiting: empty the cgroup, release it
            self._prepare_next(nextitem)
            return SandboxResult(records=[built.record], usage=usage)
        timers.before_fork(item)
        hosts = config.extra_hosts
        control_fd = config.network_control_fd

        def target(channel: Channel) -> None:
            services.enter_test_process(control_fd, hosts)
            run_protocol_in_child(item, channel, self.carriers, self.reporter, environment)

        before_kill = None
        if self.keeper is not None and isinstance(built, Prebuilt):
            before_kill = self._snapshot_later(item, prepared, built, config, environment)
        return self.supervisor.run(
            config,
            target,
            prebuilt=built,
            timeout=prepared.spec.timeout,
            cgroup=prepared.cgroup,
            while_running=lambda: self._prepare_next(nextitem),  # the builder works while the test runs
            before_kill=before_kill,
            disk_bound=prepared.spec.disk,
        )

    def _snapshot_later(
        self, item: pytest.Item, prepared: Prepared, built: Prebuilt, config: Any, environment: dict[str, str]
    ) -> Callable[[SandboxResult], None]:
        """--nsbox-keep: what P does when the test is over and before it kills the sandbox."""
        keeper = self.keeper
        assert keeper is not None
        spec = prepared.spec

        def snapshot(result: SandboxResult) -> None:
            try:
                take(result)
            except Exception as exc:  # noqa: BLE001 - P's loop goes on; the test says it was not kept
                keeper.snapshot_failed(item.nodeid, f"{type(exc).__name__}: {exc}")

        def take(result: SandboxResult) -> None:
            if keeper.settings.mode == "failed":
                usage = prepared.cgroup.usage() if prepared.cgroup is not None else Usage()
                hit = bool(usage.oom_kills or usage.pids_limit_hits)
                if not kept.may_have_failed(result.records, result.done, result.timed_out, hit):
                    return
            from .box.keep import init_files, kept_sources, mount_points, pid_of_pidfd

            image = prepared.image.root if prepared.image is not None else spec.image
            meta = {
                "nodeid": item.nodeid,
                "rootdir": str(item.config.rootpath),
                "image": spec.image,
                "image_root": list(image) if isinstance(image, tuple) else image,
                "network": network_mode(spec.network),
                "hostname": HOSTNAME,
                "cwd": config.cwd,
                "environment": kept.test_environment(os.environ, environment, spec.drop_env or ()),
                "limits": {name: getattr(spec, name) for name in ("memory", "pids", "cpus", "timeout", "disk")},
                "host_paths": [[hp.path, hp.access] for hp in prepared.plan.host_paths],
                "started": result.started,
            }
            keeper.snapshot(
                item.nodeid,
                built.scratch_path(),
                meta,
                kept_sources(prepared.plan),
                mount_points(prepared.plan),
                pid_of_pidfd(built.pidfd),
                init_files(prepared.plan),
            )

        return snapshot

    def _keep(self, item: pytest.Item, outcome: reports.SandboxReports, *, forked: bool) -> None:
        """Keep the test's layer or not, by its outcome; say so on its reports."""
        keeper = self.keeper
        assert keeper is not None
        failed = any(r.failed for r in outcome.reports)
        result = "failed" if failed else "skipped" if any(r.skipped for r in outcome.reports) else "passed"
        try:
            directory, why_not, changes = keeper.finish(item.nodeid, failed, result, forked)
        except Exception as exc:  # noqa: BLE001 - the test's files are untrusted input; the run goes on
            directory, why_not, changes = None, f"{type(exc).__name__}: {exc}", None
        target = next((r for r in outcome.reports if r.failed), None) or next(
            (r for r in outcome.reports if r.when == "call"), outcome.reports[-1] if outcome.reports else None
        )
        if target is None:
            return
        if directory is None:
            if why_not is not None and failed:
                message = kept.NOT_KEPT.format(nodeid=item.nodeid, reason=why_not)
                path, lineno, _ = item.location
                outcome.warnings.append(
                    {"message": message, "category": reports.LEAKS_WARNING, "filename": path, "lineno": (lineno or 0) + 1}
                )
            return
        assert changes is not None
        command = keeper.shell_command(item.nodeid)
        text = changes.render(more_hint=f" (nsbox diff {item.nodeid!r} lists them all)")
        section = f"kept in {directory}\nre-enter: {command}\n\n{text}"
        for report in outcome.reports:  # junit-xml takes the teardown report's properties
            report.user_properties.extend([(kept.KEPT_PROPERTY, str(directory)), (kept.KEPT_COMMAND_PROPERTY, command)])
        add_section = getattr(target.longrepr, "addsection", None)
        if target.failed and callable(add_section):
            add_section(kept.CHANGES_SECTION, section)  # the terminal's and junit's failure text
        elif target.failed and isinstance(target.longrepr, str):
            target.longrepr += f"\n\n{kept.CHANGES_SECTION}\n{section}"
        else:
            target.sections.append((kept.CHANGES_SECTION, section))

    def too_small_to_start(self, prepared: Prepared, result: SandboxResult) -> str | None:
        """Why the sandbox could not start the test because its own limit is too small (with the
        smallest value that works here), or None.

        The test never reported a phase and the kernel counted a limit hit; for memory, the limit
        is also below what an empty sandbox takes here (measured once per image), so a test whose
        function-scoped fixtures outgrow the limit still reads as exceeding it."""
        usage, spec = result.usage, prepared.spec
        if not (usage.oom_kills or usage.pids_limit_hits) or any(record["kind"] == "report" for record in result.records):
            return None
        if spec.memory is not None and usage.oom_kills:
            cost = self.start_cost(prepared)
            smallest = start_memory_floor(cost)
            if spec.memory < smallest:
                measured = f"an empty sandbox peaked at {format_size(cost)}" if cost else "an empty sandbox could not be measured"
                return reports.MEMORY_TOO_SMALL.format(
                    limit=format_size(spec.memory), measured=measured, smallest=f"{smallest // 2**20}M"
                )
        if spec.pids is not None and usage.pids_limit_hits and spec.pids < PIDS_TO_START:
            return reports.PIDS_TOO_SMALL.format(limit=spec.pids, smallest=PIDS_TO_START)
        return None

    def start_cost(self, prepared: Prepared) -> int | None:
        """The peak memory of an empty sandbox with *prepared*'s plan, built by forks of P (the
        heavier form), with memory accounted but not limited. None if it cannot be measured."""
        key = id(prepared.plan)
        if key not in self._start_costs:
            unlimited = replace(prepared.spec, memory=None, pids=None, cpus=None)
            peak = None
            try:
                cgroup = self.preparer.cgroup_for(unlimited)
                if cgroup is not None:
                    scratch_dir = self.preparer.new_scratch_dir(None, "an empty sandbox") if prepared.plan.on_disk else None
                    config = replace(
                        Prepared(unlimited, prepared.plan, cgroup, scratch_dir=scratch_dir).config(), stdio_copies=()
                    )
                    peak = self.supervisor.run(config, lambda channel: None, cgroup=cgroup).usage.memory_peak
            except (OSError, NsboxError) as exc:  # the figure is a courtesy: the message says it is missing
                log.debug("nsbox: could not measure an empty sandbox: %s", exc)
            self._start_costs[key] = peak
        return self._start_costs[key]

    def _prepare_next(self, nextitem: pytest.Item | None) -> None:
        self.lookahead.prepare_next(nextitem, nextitem is not None and self.wants(nextitem))

    def _teardown_outside(
        self, item: pytest.Item, nextitem: pytest.Item | None, in_sandbox: pytest.TestReport | None, *, keep_wider: bool
    ) -> pytest.TestReport:
        """Tear down the wider-scoped fixtures P holds (unless the item runs again); one report
        with the sandbox's teardown."""
        session = item.session
        if session.shouldfail or session.shouldstop:
            nextitem = None

        def teardown() -> None:
            if keep_wider:
                compat.drop_request(item)
            else:
                compat.teardown_towards(item, nextitem)

        call = pytest.CallInfo.from_call(teardown, when="teardown")
        return reports.merge_teardown(item, in_sandbox, call)


# --- in the test process (C) -------------------------------------------------------------------


class ChildReporter:
    """In C: sends every report logged for the item to P, in the order it is logged.

    Registered once per session on the session's own config, in P, where it has no channel and
    does nothing; C gives it the channel to P (registering a plugin in C for every test would
    cost milliseconds: pytest parses the new plugin for fixtures and replays historic hooks). A
    pytest session run inside the test (pytester's ``runpytest``/``inline_run``) has a config and
    a reporter of its own, without a channel, and keeps its reports to itself. The phase
    reports (setup, call, teardown of the item) are marked: P's phase logic works off them,
    while other reports (subtests, other plugins' reports) are logged in P as they came.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.channel: Channel | None = None  # set in C only
        self._in_phase = 0  # > 0 while a runtest phase hook runs (reports made then are not phase reports)
        self._phase_report: pytest.TestReport | None = None
        self.interactive = False  # the test waits at pdb's prompt

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        return (yield from self._phase())

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        return (yield from self._phase())

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
        return (yield from self._phase())

    def _phase(self) -> Generator[None, None, None]:
        if self.channel is None:
            return (yield)
        self._in_phase += 1
        try:
            return (yield)
        finally:
            self._in_phase -= 1

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if self.channel is not None and self._in_phase == 0:
            self._phase_report = report  # the protocol's own report of the phase, logged next
        return report

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.channel is None:
            return
        config = self.config
        data = config.hook.pytest_report_to_serializable(config=config, report=report)
        self.channel.send("report", data=data, phase=report is self._phase_report)

    @pytest.hookimpl(wrapper=True)
    def pytest_exception_interact(self, report: pytest.TestReport) -> Generator[None, None, None]:
        try:
            return (yield)
        finally:
            if self.channel is not None and compat.pdb_shown(report):  # set after the report was sent; also on "q"
                self.channel.send(reports.PDB_SHOWN, when=report.when)

    def pytest_enter_pdb(self) -> None:
        self.set_interactive(True)

    def pytest_leave_pdb(self) -> None:
        self.set_interactive(False)

    def set_interactive(self, active: bool) -> None:
        """Tell P the test waits for the user (pdb's prompt) or goes on (see box.config.INTERACTIVE)."""
        if self.channel is not None and self.interactive != active:
            self.interactive = active
            self.channel.send(INTERACTIVE, active=active)


def child_channel(config: pytest.Config) -> Channel | None:
    """In C, the channel to P of the sandboxed session of *config*; None in P (or in a session
    run inside a sandboxed test)."""
    reporter = config.pluginmanager.get_plugin(CHILD_REPORTER)
    return reporter.channel if isinstance(reporter, ChildReporter) else None


def run_protocol_in_child(
    item: pytest.Item, channel: Channel, carriers: Carriers, reporter: ChildReporter, environment: dict[str, str] | None = None
) -> None:
    """In C: pytest's runtest protocol for the item, with the image's *environment* set over
    pytest's (nothing to restore: C is thrown away); reports go out as they are logged (by
    *reporter*, registered in P), then what the carriers collected."""
    os.environ.update(environment or {})
    config = item.config
    reporter.channel = channel
    compat.log_only_to(config, keep=(reporter, item.session))  # P presents the reports, not C
    compat.own_no_wider_fixtures(item)
    for record in carriers.before(item):
        channel.send(**record)
    with warnings.catch_warnings(record=True) as caught:
        try:
            timers.arm_in_child(item)
            compat.run_protocol(item)
            timers.disarm_in_child(item)
        except pytest.exit.Exception as exc:
            channel.send("exit", msg=exc.msg, returncode=exc.returncode)
        except KeyboardInterrupt:
            channel.send("interrupt")
        finally:
            reporter.set_interactive(False)  # "q" at pdb's prompt leaves without pytest_leave_pdb
    for w in caught:
        channel.send(
            "warning",
            message=str(w.message),
            category=f"{w.category.__module__}:{w.category.__qualname__}",
            filename=w.filename,
            lineno=w.lineno,
        )
    send_disk_usage(channel)
    for record in carriers.collect(item):
        channel.send(**record)


def send_disk_usage(channel: Channel) -> None:
    """In C, after the test: how full the sandbox's scratch tmpfs is (/tmp is a directory of it)."""
    try:
        usage = os.statvfs(DISK_PROBE)
    except OSError:
        return
    channel.send(reports.DISK_USAGE, free=usage.f_bavail * usage.f_frsize, free_inodes=usage.f_favail)


def replay_warning(record: dict[str, Any]) -> None:
    """In P: re-issue a warning the test raised, so pytest's warnings summary lists it."""
    module_name, _, qualname = str(record.get("category", "")).partition(":")
    category: Any = UserWarning
    module = sys.modules.get(module_name)  # never import what the test named
    if module is not None:
        candidate: Any = module
        for part in qualname.split("."):
            candidate = getattr(candidate, part, None)
        if isinstance(candidate, type) and issubclass(candidate, Warning):
            category = candidate
    warnings.warn_explicit(
        str(record.get("message", "")), category, str(record.get("filename", "?")), int(record.get("lineno") or 0)
    )
