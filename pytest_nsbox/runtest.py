"""Run one pytest item in a sandbox: the fixture split, the protocol in C, the replay in P.

Wider-scoped fixtures (class, module, package, session) run in P before the fork, so C inherits
them and P tears them down at the usual time; function-scoped fixtures, the test and its
teardown run in C. Reports cross the pipe via pytest_report_to_serializable.
"""

from __future__ import annotations

import logging
import os
import pwd
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import pytest

from . import cgroups, images, mounts, oci, prebuild, probe, reports, sandbox
from .spec import Defaults, SandboxSpec, SpecError, format_size, spec_from_marker

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "pytest-nsbox-"
MARKER = "nsbox"


Prepared = tuple[SandboxSpec, mounts.MountPlan, "cgroups.Cgroup | None"] | pytest.TestReport
"""An item's spec, mount plan and cgroup, or the report that says why it gets no sandbox."""


class NsboxWarning(pytest.PytestWarning):
    """Something pytest-nsbox worked around; the tests still ran sandboxed."""


class ChildState:
    """Set in C only: where the report hook sends reports."""

    channel: sandbox.Channel | None = None


CHILD = ChildState()


def interpreter_paths() -> list[str]:
    """Directories the interpreter may import from after pivot_root.

    The library directories, not the prefixes: a system interpreter's prefix is /usr, and binding
    the host's /usr would hide the image's.
    """
    paths: set[str] = set()
    for scheme_vars in ({}, {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):
        library_paths = sysconfig.get_paths(vars=scheme_vars)
        paths.update(library_paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib"))
    paths.update(p for p in sys.path if p)
    if sys.prefix != sys.base_prefix:
        paths.add(sys.prefix)  # a venv: its bin/ and pyvenv.cfg, so subprocesses find site-packages
    found = {os.path.abspath(p) for p in paths if os.path.isdir(p)}
    # the interpreter binary itself (a file bind), so the test can start subprocesses with it
    found.update(p for p in (os.path.abspath(sys.executable), os.path.realpath(sys.executable)) if os.path.isfile(p))
    return sorted(found)


def sweep_stale_scratch_dirs(tmpdir: str) -> None:
    """Remove empty scratch mount points left by pytest processes that were killed."""
    uid = os.getuid()
    try:
        entries = list(os.scandir(tmpdir))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(SCRATCH_PREFIX):
            continue
        pid_text = entry.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or os.path.exists(f"/proc/{pid_text}"):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid == uid:
                os.rmdir(entry.path)  # rmdir only: it is empty unless it is not ours
        except OSError:
            pass


class SandboxRunner:
    """Per-session state: ini defaults, the scratch mount point, mount plans per image."""

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
    ) -> None:
        self.config = config
        self.cgroup_root = cgroup_root
        self._cgroup_manager: cgroups.CgroupManager | None = _UNSET
        self._availability: dict[tuple[str, ...], cgroups.Availability] = {}
        self._images: dict[str, images.Resolved] = {}
        self.cache_dir = Path(cache_dir) if cache_dir else oci.default_cache_dir()
        self.defaults = defaults
        self.sandbox_all = sandbox_all
        self.require = require
        self._scratch: str | None = None
        self._plans: dict[tuple[images.Resolved, str], mounts.MountPlan] = {}
        self._host_namespaces: dict[str, int] | None = None
        self._cap_last_cap = sandbox.read_cap_last_cap()
        self._builder = prebuild.Builder() if prebuild_ahead and probe.prebuild_supported() else None
        self._next: tuple[pytest.Item, Prepared, int | None] | None = None  # the next item, prepared ahead

    # --- session -------------------------------------------------------------------------

    def wants(self, item: pytest.Item) -> bool:
        return self.sandbox_all or item.get_closest_marker(MARKER) is not None

    def close(self) -> None:
        if self._next is not None:
            self._discard(*self._next[1:])
            self._next = None
        sandbox.reap_finished(block=True)
        if self._builder is not None:
            self._builder.close()
        if isinstance(self._cgroup_manager, cgroups.CgroupManager):
            self._cgroup_manager.close()
        if self._scratch is not None:
            try:
                os.rmdir(self._scratch)
            except OSError:
                pass
            self._scratch = None

    def scratch(self) -> str:
        if self._scratch is None:
            tmpdir = tempfile.gettempdir()
            sweep_stale_scratch_dirs(tmpdir)
            self._scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=tmpdir)
        return self._scratch

    def spec_for(self, item: pytest.Item) -> SandboxSpec:
        marker = item.get_closest_marker(MARKER)
        args: tuple[object, ...] = marker.args if marker else ()
        kwargs: dict[str, object] = dict(marker.kwargs) if marker else {}
        spec = spec_from_marker(args, kwargs, item.nodeid, self.defaults)
        changed = item.ihook.pytest_nsbox_modify_spec(item=item, spec=spec)
        return changed if changed is not None else spec

    def resolve_image(self, name: str) -> images.Resolved:
        hooked = self.config.hook.pytest_nsbox_resolve_image(config=self.config, name=name)
        if hooked is not None:
            return str(hooked)
        if name not in self._images:
            image_dirs = [str(d) for d in self.config.getini("nsbox_image_dirs")]
            self._images[name] = images.resolve(name, self.config.rootpath, self.cache_dir, image_dirs)
        return self._images[name]

    def plan(self, image: images.Resolved, network: str) -> mounts.MountPlan:
        key = (image, network)
        if key not in self._plans:
            host_paths = [mounts.HostPath(p, readonly=True) for p in interpreter_paths()]
            host_paths.append(mounts.HostPath(str(self.config.rootpath), readonly=True))
            basetemp = self._basetemp()
            if basetemp:
                host_paths.append(mounts.HostPath(basetemp, readonly=False))
            try:
                resolv = Path("/etc/resolv.conf").read_text()
            except OSError:
                resolv = ""
            self._plans[key] = mounts.build_plan(
                image=image,
                network=network,
                scratch=self.scratch(),
                host_paths=host_paths,
                mounts=mounts.MountTable.read(),
                host_resolv_conf=resolv,
                own_trees=self._own_trees(),
                stacks_dir=str(self.cache_dir / "stacks"),
            )
        return self._plans[key]

    def _own_trees(self) -> list[str]:
        """Rootless: the caller's home, rootdir and cwd get overlays of their own (see build_plan)."""
        if os.getuid() == 0:
            return []
        candidates = [pwd.getpwuid(os.getuid()).pw_dir, str(self.config.rootpath), os.getcwd()]
        return [p for p in candidates if os.path.isdir(p) and os.stat(p).st_uid == os.getuid()]

    def _basetemp(self) -> str | None:
        factory = getattr(self.config, "_tmp_path_factory", None)
        if factory is None:
            return None
        return str(factory.getbasetemp())

    def sandbox_config(self, spec: SandboxSpec, plan: mounts.MountPlan, cgroup: cgroups.Cgroup | None) -> sandbox.SandboxConfig:
        if self._host_namespaces is None:
            self._host_namespaces = sandbox.namespace_ids()
        return sandbox.SandboxConfig(
            plan=plan,
            network=spec.network,
            uid=os.getuid(),
            gid=os.getgid(),
            host_namespaces=self._host_namespaces,
            cwd=os.getcwd(),
            cap_last_cap=self._cap_last_cap,
            cgroup_files=tuple(cgroup.join_files) if cgroup is not None else (),
            oom_first=cgroup is not None and spec.memory is not None,
        )

    # --- sandboxes built ahead of time ---------------------------------------------------

    def _submit(self, config: sandbox.SandboxConfig) -> int | None:
        """Have the builder build a sandbox for *config*; None: build it when the test starts."""
        if self._builder is None:
            return None
        try:
            return self._builder.submit(config)
        except prebuild.BuilderError as exc:
            self._builder_failed(exc)
            return None

    def _take(self, ticket: int | None) -> sandbox.Prebuilt | prebuild.Failed | None:
        if ticket is None or self._builder is None:
            return None
        try:
            built = self._builder.take(ticket)
        except prebuild.BuilderError as exc:
            self._builder_failed(exc)
            return None
        if isinstance(built, sandbox.Prebuilt) and built.exited():
            built.close()  # killed from outside, or with the builder (PR_SET_PDEATHSIG): build anew
            if not self._builder.alive():
                self._builder_failed(prebuild.BuilderError("the sandbox builder died"))
            return None
        return built

    def _builder_failed(self, exc: prebuild.BuilderError) -> None:
        """Go on without the builder: each sandbox is then built by a fork of pytest (slower)."""
        warnings.warn(NsboxWarning(reports.BUILDER_LOST.format(detail=exc)), stacklevel=1)
        builder, self._builder = self._builder, None
        if builder is not None:
            builder.close()

    def _prepare_next(self, nextitem: pytest.Item | None) -> None:
        """Prepare the next item now and have its sandbox built while the current test runs."""
        if self._builder is None or nextitem is None or not self.wants(nextitem):
            return
        try:
            prepared = self._prepare(nextitem, ahead=True)
        except Exception:  # noqa: BLE001 - it surfaces again when the item runs
            return
        if prepared is None:
            return
        ticket = None
        if not isinstance(prepared, pytest.TestReport):
            ticket = self._submit(self.sandbox_config(*prepared))
        self._next = (nextitem, prepared, ticket)

    def _take_prepared(self, item: pytest.Item) -> tuple[Prepared, int | None]:
        if self._next is not None:
            next_item, prepared, ticket = self._next
            self._next = None
            if next_item is item:
                return prepared, ticket
            self._discard(prepared, ticket)
        return self._prepare(item), None

    def _discard(self, prepared: Prepared, ticket: int | None) -> None:
        """Kill a sandbox built for an item that did not run next; remove its cgroup."""
        answer = self._take(ticket)
        if isinstance(answer, sandbox.Prebuilt):
            answer.kill()
            answer.exited(timeout=5.0)
            answer.close()
        if not isinstance(prepared, pytest.TestReport) and prepared[2] is not None:
            cgroup = prepared[2]
            cgroup.kill()  # A' may still be on its way out
            self._remove_cgroup(cgroup)

    # --- one item ------------------------------------------------------------------------

    def run_item(self, item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[pytest.TestReport]:
        """Yield the item's reports in order; raise pytest.exit/KeyboardInterrupt as the test did."""
        sandbox_reports: list[pytest.TestReport] = []
        pending_raise: BaseException | None = None
        prepared, ticket = self._take_prepared(item)
        if isinstance(prepared, pytest.TestReport):
            self._prepare_next(nextitem)
            yield prepared
        else:
            spec, plan, cgroup = prepared
            if ticket is None:
                ticket = self._submit(self.sandbox_config(spec, plan, cgroup))
            setup = pytest.CallInfo.from_call(lambda: setup_wider_fixtures(item), when="setup")
            if setup.excinfo is not None:
                self._discard(prepared, ticket)
                self._prepare_next(nextitem)
                yield item.ihook.pytest_runtest_makereport(item=item, call=setup)
            else:
                config = self.sandbox_config(spec, plan, cgroup)  # now: the cwd the wider fixtures left
                built = self._take(ticket)
                after_reap = (lambda: self._remove_cgroup(cgroup)) if cgroup is not None else None
                if isinstance(built, prebuild.Failed):
                    result = sandbox.SandboxResult(records=[built.record])
                    self._discard(prepared, None)  # its processes are exiting: empty the cgroup, remove it
                    self._prepare_next(nextitem)
                else:
                    result = sandbox.run(
                        config,
                        lambda ch: run_protocol_in_child(item, ch),
                        timeout=spec.timeout,
                        cgroup=cgroup,
                        after_reap=after_reap,
                        prebuilt=built,
                        while_running=lambda: self._prepare_next(nextitem),  # the builder works while the test runs
                    )
                usage = result.usage
                item.ihook.pytest_nsbox_sandbox_finished(item=item, spec=spec, result=result)
                sandbox_reports, pending_raise = self._reports_from(item, result, spec, usage)
                properties = limit_properties(spec, usage)
                for report in sandbox_reports:
                    report.user_properties.extend(properties)
                yield from (r for r in sandbox_reports if r.when != "teardown")
        if pending_raise is not None:
            raise pending_raise  # as in pytest: the session's teardown_exact(None) tears down the rest
        c_teardown = next((r for r in sandbox_reports if r.when == "teardown"), None)
        yield self._teardown_in_parent(item, nextitem, c_teardown)

    @overload
    def _prepare(self, item: pytest.Item) -> Prepared: ...

    @overload
    def _prepare(self, item: pytest.Item, *, ahead: bool) -> Prepared | None: ...

    def _prepare(self, item: pytest.Item, *, ahead: bool = False) -> Prepared | None:
        """The spec and mount plan, or the setup report that says why there is no sandbox.

        *ahead* (while another test runs): None instead of resolving an image not resolved yet,
        which may mean a long build that must not delay the running test's timeout.
        """
        error: str | None = None
        try:
            spec = self.spec_for(item)
        except SpecError as exc:
            error = str(exc)
        if error is not None:
            return reports.failure_report(item, "setup", error)
        if ahead and spec.image != "host" and spec.image not in self._images:
            return None
        if not probe.linux().ok:
            return self._unavailable(item, probe.linux().describe())
        try:
            plan = self.plan(self.resolve_image(spec.image), spec.network)
        except images.ImageError as exc:
            error = f"nsbox: {exc} (test {item.nodeid})"
        except OSError as exc:
            return self._unavailable(item, f"nsbox: could not plan the sandbox's mounts: {exc}")
        if error is not None:
            return reports.failure_report(item, "setup", error)
        cgroup = self._make_cgroup(spec)
        if isinstance(cgroup, str):
            return self._unavailable(item, cgroup)
        return spec, plan, cgroup

    # --- cgroups -------------------------------------------------------------------------

    def cgroup_manager(self) -> cgroups.CgroupManager | None:
        if self._cgroup_manager is _UNSET:
            manager = cgroups.detect(self.cgroup_root)
            if manager is not None:
                manager.sweep()
            self._cgroup_manager = manager
        return self._cgroup_manager  # type: ignore[return-value]

    def _make_cgroup(self, spec: SandboxSpec) -> cgroups.Cgroup | str | None:
        """The sandbox's cgroup; None if none is needed or only defaults could not be had; a
        message (why the requested limits cannot be enforced) otherwise."""
        requested = cgroups.Limits(memory=spec.memory, pids=spec.pids, cpus=spec.cpus).controllers()
        manager = self.cgroup_manager()
        if manager is None:
            if not requested:
                return None
            return LIMITS_UNAVAILABLE.format(names=", ".join(requested), reason="no cgroup hierarchy found", fix="")
        wanted = cgroups.Limits(
            memory=spec.memory, pids=spec.pids or DEFAULT_PIDS, cpus=spec.cpus, account_memory=True
        ).controllers()
        if not self._check(manager, wanted).ok:
            if any(not self._check(manager, [c]).ok for c in requested):
                problem = self._check(manager, requested)
                return LIMITS_UNAVAILABLE.format(names=", ".join(requested), reason=problem.reason, fix=_hint(problem.fix))
            wanted = [c for c in wanted if self._check(manager, [c]).ok]
        limits = cgroups.Limits(
            memory=spec.memory,
            pids=(spec.pids or DEFAULT_PIDS) if "pids" in wanted else None,
            cpus=spec.cpus,
            account_memory="memory" in wanted,
        )
        if not limits.controllers():
            return None
        try:
            return manager.create(limits)
        except cgroups.CgroupError as exc:
            if requested:
                return LIMITS_UNAVAILABLE.format(names=", ".join(requested), reason=str(exc), fix="")
            log.debug("nsbox: default limits not applied: %s", exc)
            return None

    def _check(self, manager: cgroups.CgroupManager, controllers: list[str]) -> cgroups.Availability:
        """Whether *controllers* can be had, probed once per session."""
        key = tuple(controllers)
        if key not in self._availability:
            self._availability[key] = manager.check(controllers)
        return self._availability[key]

    @staticmethod
    def _remove_cgroup(cgroup: cgroups.Cgroup) -> None:
        try:
            cgroup.remove()
        except cgroups.CgroupError as exc:
            log.warning("%s", exc)

    def _unavailable(self, item: pytest.Item, message: str) -> pytest.TestReport:
        if self.require:
            return reports.failure_report(item, "setup", message + reports.REQUIRE_NOTE)
        return reports.skip_report(item, message)

    def _reports_from(
        self, item: pytest.Item, result: sandbox.SandboxResult, spec: SandboxSpec, usage: cgroups.Usage
    ) -> tuple[list[pytest.TestReport], BaseException | None]:
        out: list[pytest.TestReport] = []
        pending: BaseException | None = None
        for record in result.records:
            kind = record["kind"]
            if kind == "report":
                try:
                    out.append(self.config.hook.pytest_report_from_serializable(config=self.config, data=record["data"]))
                except Exception as exc:  # noqa: BLE001 - the stream comes from untrusted code
                    out.append(reports.failure_report(item, "call", reports.UNUSABLE_REPORT.format(detail=exc)))
            elif kind == "warning":
                replay_warning(record)
            elif kind == "exit":
                pending = pytest.exit.Exception(str(record.get("msg", "")), returncode=record.get("returncode"))
            elif kind == "interrupt":
                pending = KeyboardInterrupt()
            elif kind == "setup_error":
                return [self._setup_error_report(item, record)], None
            elif kind == "internal_error":
                text = reports.INTERNAL_ERROR.format(process=record.get("process"), traceback=record.get("traceback"))
                out.append(reports.failure_report(item, "call", text))
        cause = limit_violation(spec, result, usage)
        if cause is None and result.wire_error:
            cause = Cause(reports.CORRUPT_STREAM.format(detail=result.wire_error), [])
        if pending is None:
            out.extend(self._missing_phases(item, out, result.test_status, cause))
        if cause is not None:
            out = [_with_cause(item, r, cause) for r in out]
        return out, pending

    def _setup_error_report(self, item: pytest.Item, record: dict[str, Any]) -> pytest.TestReport:
        step = str(record.get("step"))
        message = reports.SETUP_FAILED.format(step=step, message=record.get("message"))
        if step == "verify_sandbox":
            return reports.failure_report(item, "setup", reports.NOT_INSIDE.format(message=record.get("message")))
        hint = probe.hint_for(step, record.get("errno"))
        if hint:
            message += reports.SKIP_HINT.format(hint=hint)
        if record.get("traceback"):
            message += "\n" + str(record["traceback"])
        return self._unavailable(item, message)

    def _missing_phases(
        self, item: pytest.Item, got: list[pytest.TestReport], status: int | None, cause: Cause | None
    ) -> list[pytest.TestReport]:
        """Reports for phases the test never reported: it crashed, exited or was killed before."""
        phases = {r.when: r for r in got}
        complete = status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if complete and "teardown" in phases and cause is None:
            return []
        out: list[pytest.TestReport] = []
        setup = phases.get("setup")
        if setup is None:
            missing = "setup"
        elif setup.passed and "call" not in phases and not self.config.getoption("setuponly", False):
            missing = "call"
        elif "teardown" not in phases:
            missing = "teardown"
        else:
            return []
        if cause is not None:
            message, sections = cause.message, [*self._captured(), *cause.sections]
            cause.reported = True
        else:
            message, sections = reports.early_end_message(status, missing), self._captured()
        out.append(reports.failure_report(item, missing, message, sections))
        if missing != "teardown":
            out.append(reports.passed_report(item, "teardown"))
        return out

    def _captured(self) -> list[tuple[str, str]]:
        """What the test wrote to the (shared) capture files before it died."""
        capman = self.config.pluginmanager.getplugin("capturemanager")
        if capman is None or not capman.is_globally_capturing():
            return []
        try:
            out, err = capman.read_global_capture()
        except Exception:  # noqa: BLE001
            return []
        return [(f"Captured {name} before the crash", text) for name, text in (("stdout", out), ("stderr", err)) if text]

    def _teardown_in_parent(
        self, item: pytest.Item, nextitem: pytest.Item | None, c_report: pytest.TestReport | None = None
    ) -> pytest.TestReport:
        """Tear down the wider-scoped fixtures P holds; merge with C's teardown report."""
        session = item.session
        if session.shouldfail or session.shouldstop:
            nextitem = None
        call = pytest.CallInfo.from_call(lambda: session._setupstate.teardown_exact(nextitem), when="teardown")
        if hasattr(item, "_request"):
            item._request = False  # type: ignore[attr-defined]
            item.funcargs = None  # type: ignore[attr-defined]
        if call.excinfo is None:
            return c_report if c_report is not None else reports.passed_report(item, "teardown")
        p_report: pytest.TestReport = item.ihook.pytest_runtest_makereport(item=item, call=call)
        if c_report is None or c_report.passed:
            if c_report is not None:
                p_report.sections[:0] = c_report.sections
            return p_report
        c_report.sections.append(("nsbox: teardown outside the sandbox", str(p_report.longrepr)))
        return c_report


DEFAULT_PIDS = 1024
LIMITS_UNAVAILABLE = "nsbox: cannot enforce the requested limits ({names}): {reason}{fix}"
_UNSET: Any = object()


def _hint(fix: str) -> str:
    return f". Hint: {fix}" if fix else ""


@dataclass
class Cause:
    """A limit the sandbox hit: the failure message and extra report sections."""

    message: str
    sections: list[tuple[str, str]]
    reported: bool = False


def limit_violation(spec: SandboxSpec, result: sandbox.SandboxResult, usage: cgroups.Usage) -> Cause | None:
    """Why the test must fail because of its limits, from the kernel's own counters."""
    if result.timed_out:
        stack = trim_stack(result.stack)
        sections = [("nsbox: stack at timeout", stack)] if stack else []
        return Cause(reports.TIMED_OUT.format(seconds=spec.timeout or 0.0), sections)
    if usage.oom_kills and spec.memory is not None:
        peak = format_size(usage.memory_peak) if usage.memory_peak is not None else "unknown"
        plural = "es" if usage.oom_kills != 1 else ""
        text = reports.MEMORY_EXCEEDED.format(limit=format_size(spec.memory), peak=peak, count=usage.oom_kills, plural=plural)
        return Cause(text, [])
    if usage.pids_limit_hits:
        limit = spec.pids or DEFAULT_PIDS
        return Cause(reports.PIDS_EXCEEDED.format(limit=limit, count=usage.pids_limit_hits), [])
    return None


def trim_stack(dump: str) -> str:
    """faulthandler's dump without the frames of pytest-nsbox and pytest's main loop below the test."""
    kept, skipping = [], False
    for line in dump.splitlines():
        if line.startswith(("Thread ", "Current thread ")):
            skipping = False  # a new thread's stack
        elif "/pytest_nsbox/runtest.py" in line:
            skipping = True  # every frame below is the sandbox's own machinery
        if not skipping:
            kept.append(line)
    return "\n".join(kept).strip()


def _with_cause(item: pytest.Item, report: pytest.TestReport, cause: Cause) -> pytest.TestReport:
    """Make the call report fail with *cause* (once); other reports pass through."""
    if cause.reported or report.when != "call":
        return report
    cause.reported = True
    if report.failed:
        report.sections.append(("nsbox: limit", cause.message))
        return report
    return reports.failure_report(item, "call", cause.message, [*report.sections, *cause.sections])


def limit_properties(spec: SandboxSpec, usage: cgroups.Usage) -> list[tuple[str, object]]:
    """user_properties for junit-xml and the memory summary."""
    properties: list[tuple[str, object]] = []
    if usage.memory_peak is not None:
        properties.append(("nsbox_memory_peak", usage.memory_peak))
    if spec.memory is not None:
        properties.append(("nsbox_memory_limit", spec.memory))
    return properties


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


def run_protocol_in_child(item: pytest.Item, channel: sandbox.Channel) -> None:
    """In C: pytest's runtest protocol for the item; reports go out through the makereport hook."""
    from _pytest.runner import runtestprotocol

    CHILD.channel = channel
    with warnings.catch_warnings(record=True) as caught:
        try:
            # nextitem=item.parent: tear down the item only; P owns the wider fixtures.
            runtestprotocol(item, log=False, nextitem=item.parent)  # type: ignore[arg-type]
        except pytest.exit.Exception as exc:
            channel.send("exit", msg=exc.msg, returncode=exc.returncode)
        except KeyboardInterrupt:
            channel.send("interrupt")
    for w in caught:
        channel.send(
            "warning",
            message=str(w.message),
            category=f"{w.category.__module__}:{w.category.__qualname__}",
            filename=w.filename,
            lineno=w.lineno,
        )


def send_report(config: pytest.Config, report: pytest.TestReport) -> None:
    """In C: send one report (called from the makereport wrapper)."""
    if CHILD.channel is not None:
        data = config.hook.pytest_report_to_serializable(config=config, report=report)
        CHILD.channel.send("report", data=data)


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
