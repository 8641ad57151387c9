"""``nsbox doctor``: probe exactly the setup the plugin would use with this project's ini file and
this environment, and say for each problem why and how to fix it.

The exit rule (``nsbox doctor`` exits 1 on any FAIL, else 0): FAIL is only what makes sandboxed
tests SKIP (ERROR under ``--nsbox-require``) or error with the project's configuration as it is:

- no Linux, no user namespaces, no overlayfs in one: no sandbox at all;
- an invalid nsbox_* ini value: pytest stops with a usage error;
- a limit default in the ini (``nsbox_memory``, ``nsbox_pids``, ``nsbox_cpus``) whose controller
  cannot be had: every sandboxed test is refused;
- a cgroup root named in the ini or the environment where the memory or pids controller cannot be
  had: the configuration asks for cgroups there, and gets none;
- an image cache that cannot be written when the ini's default image needs it.

Everything else that is missing is a WARN: cgroups where none is configured (tests that *request*
a limit are refused; sandboxes run without the default pids cap or the peak-memory report), the
cpu controller, subordinate ids (image builds that need root; ids 0-65536 in sandboxes). Nothing is left behind: cgroups are
checked without writing, then one test cgroup is created and removed where the check passes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from . import __version__, images, probe
from .box import cgroups
from .errors import NsboxError
from .project import Project
from .spec import DEFAULT_PIDS, Defaults, defaults_from, describe_defaults

Status = Literal["ok", "WARN", "FAIL", "info"]
CONTROLLERS: Final = ("memory", "pids", "cpu")
GIVES: Final = {
    "memory": "memory limits, the peak-memory report",
    "pids": f"pids limits, the default pids cap ({DEFAULT_PIDS})",
    "cpu": "cpus limits",
}
LIMIT_OF: Final = {"memory": "memory", "pids": "pids", "cpu": "cpus"}
OK_EXIT: Final = "sandboxes can be built with this configuration"
NO_HIERARCHY_FIX: Final = (
    "mount the cgroup filesystem (as root: mount -t cgroup2 cgroup2 /sys/fs/cgroup); "
    "in a container, start it with a writable cgroup filesystem of its own"
)
FAIL_EXIT: Final = "sandboxed tests would be skipped or error with this configuration (each FAIL above says why)"


@dataclass(frozen=True, slots=True)
class Finding:
    status: Status
    what: str
    detail: str = ""
    fix: str = ""

    def lines(self) -> list[str]:
        head = f"{self.status:<5} {self.what}" + (f": {self.detail}" if self.detail else "")
        return [head, *([f"      fix: {self.fix}"] if self.fix else [])]


def render(found: list[Finding]) -> list[str]:
    """The report's lines; a fix the finding before gave already is not repeated."""
    lines: list[str] = []
    previous = ""
    for finding in found:
        shown = finding.lines()
        if finding.fix and finding.fix == previous:
            shown[-1] = "      fix: as above"
        previous = finding.fix or previous
        lines += shown
    return lines


def _probe(result: probe.Probe, bad: Status) -> Finding:
    if result.ok:
        return Finding("ok", result.what, "ok")
    return Finding(bad, result.what, f"unavailable ({result.reason})", result.fix)


def _bool_ini(value: str, default: bool) -> bool:
    lowered = value.strip().lower()
    if not lowered:
        return default
    return lowered not in ("false", "no", "off", "0", "n", "f")


def settings(project: Project, environ: Mapping[str, str]) -> list[Finding]:
    """Which ini file and which values doctor uses (those of the plugin)."""
    found = [Finding("info", "settings", project.describe())]
    for name in sorted(project.values):
        if name.startswith("nsbox_"):
            value = project.ini_lines(name) if name == "nsbox_image_dirs" else project.ini(name)
            found.append(Finding("info", f"ini {name}", repr(value)))
    root, source = probe.cgroup_root_setting(project.ini(probe.CGROUP_ROOT_INI), environ)
    env = environ.get(probe.CGROUP_ROOT_ENV, "").strip()
    where = (
        f"{root} (from {source})"
        if root
        else f"default (neither ini {probe.CGROUP_ROOT_INI} nor env {probe.CGROUP_ROOT_ENV} is set)"
    )
    found.append(Finding("info", "cgroup root", where))
    if env and root != env:
        found.append(Finding("info", f"env {probe.CGROUP_ROOT_ENV}={env}", "ignored: the ini's nsbox_cgroup_root comes first"))
    return found


def _where(manager: cgroups.CgroupManager) -> str:
    if isinstance(manager, cgroups.ManagerV1):
        return f"{cgroups.CGROUP_MOUNT}/{{{','.join(CONTROLLERS)}}}/{manager.root_name}"
    return str(manager.roots()[0])


def _try_create(manager: cgroups.CgroupManager, controllers: list[str]) -> str:
    """Create one test cgroup with *controllers* and remove it again; '' if that worked, else why.
    Only roots this call created are removed with it."""
    existed = {root: root.is_dir() for root in manager.roots()}
    limits = cgroups.Limits(
        pids=DEFAULT_PIDS if "pids" in controllers else None,
        cpus=1.0 if "cpu" in controllers else None,
        account_memory="memory" in controllers,
    )
    try:
        cgroup = manager.create(limits)
    except cgroups.CgroupError as exc:
        return str(exc)
    else:
        try:
            cgroup.remove()
        except cgroups.CgroupError as exc:
            return str(exc)
    finally:
        for root, was in existed.items():
            if not was:
                try:
                    root.rmdir()
                except OSError:
                    pass
    return ""


def cgroup_findings(root_setting: str, source: str, defaults: Defaults) -> list[Finding]:
    """The cgroup controllers the plugin would use, each FAIL or WARN by the rule above."""
    manager = cgroups.detect(root_setting)
    configured_limits = [c for c in CONTROLLERS if getattr(defaults.spec, LIMIT_OF[c]) is not None]
    if manager is None:
        status: Status = "FAIL" if configured_limits or root_setting else "WARN"
        detail = f"{probe.NO_CGROUP_HIERARCHY}; {_consequence(configured_limits)}"
        return [Finding(status, "cgroups", detail, NO_HIERARCHY_FIX)]
    where = _where(manager)
    found = [Finding("info", f"cgroup v{manager.version}", f"sandbox cgroups go to {where}" + _own_cgroup(manager))]
    checks = {c: manager.check([c], dry_run=True) for c in CONTROLLERS}
    usable = [c for c in CONTROLLERS if checks[c].ok]
    if usable and not any(checks[c].note for c in usable):
        problem = _try_create(manager, usable)
        if problem:
            checks = {c: (cgroups.Availability(False, problem, checks[c].fix) if c in usable else checks[c]) for c in CONTROLLERS}
    for controller in CONTROLLERS:
        check = checks[controller]
        what = f"cgroup v{manager.version} {controller} ({GIVES[controller]})"
        if check.ok:
            found.append(Finding("ok", what, f"ok ({check.note})" if check.note else "ok"))
            continue
        if controller in configured_limits:
            detail = f"the ini sets nsbox_{LIMIT_OF[controller]}: every sandboxed test would be refused"
            found.append(Finding("FAIL", what, f"{check.reason}; {detail}", check.fix))
        elif root_setting and controller in ("memory", "pids"):
            detail = f"{source} names this root for sandbox cgroups, and no {controller} cgroup can be had there"
            found.append(Finding("FAIL", what, f"{check.reason}; {detail}", check.fix))
        else:
            found.append(Finding("WARN", what, f"{check.reason}; {_lost(controller)}", check.fix))
    return found


def _own_cgroup(manager: cgroups.CgroupManager) -> str:
    if isinstance(manager, cgroups.ManagerV2):
        return f" (pytest's own cgroup here: {cgroups.CGROUP_MOUNT / cgroups.own_cgroup_v2().strip('/')})"
    return ""


def _lost(controller: str) -> str:
    what = {
        "memory": "tests that request memory are refused (SKIPPED), and the peak-memory report is off",
        "pids": f"tests that request pids are refused (SKIPPED), and sandboxes run without the default pids cap ({DEFAULT_PIDS})",
        "cpu": "tests that request cpus are refused (SKIPPED)",
    }
    return what[controller]


def _consequence(configured: list[str]) -> str:
    if configured:
        limits = ", ".join(f"nsbox_{LIMIT_OF[c]}" for c in configured)
        return f"the ini sets {limits}: every sandboxed test would be refused; remove it or run where cgroups exist"
    return "tests that request limits are refused (SKIPPED); sandboxes run without the default pids cap and peak-memory report"


def cache_finding(project: Project, defaults: Defaults) -> Finding:
    """Can the image cache be written (where the ini's default image needs it)?"""
    cache_dir = project.cache_dir()
    existing = cache_dir
    while not os.path.exists(existing) and existing != existing.parent:  # False also where stat is refused
        existing = existing.parent
    what = f"image cache {cache_dir}"
    if os.access(existing, os.W_OK | os.X_OK) and os.path.isdir(existing):
        return Finding("ok", what, "ok" if existing == cache_dir else f"ok (created on first use under {existing})")
    reason = f"{existing} is not writable by {cgroups.user_name()} (uid {os.getuid()})"
    fix = "set ini nsbox_cache_dir to a directory you can write, or unset it ($XDG_CACHE_HOME/pytest-nsbox)"
    if defaults.spec.image != images.HOST:
        return Finding("FAIL", what, f"{reason}; the ini's default image {defaults.spec.image!r} needs it", fix)
    return Finding("WARN", what, f"{reason}; tests with an image other than 'host' would error", fix)


def apparmor_finding() -> Finding | None:
    """AppArmor's restriction, when it is on (read before blaming it) and user namespaces still work."""
    if os.getuid() == 0 or probe.read_sysctl("kernel.apparmor_restrict_unprivileged_userns") != "1":
        return None
    if probe.userns().ok:
        detail = "kernel.apparmor_restrict_unprivileged_userns = 1, but this interpreter may create them (its AppArmor profile)"
        return Finding("info", "AppArmor", detail)
    return None  # the user namespaces FAIL carries the diagnosis and both fixes


def build_mode(project: Project) -> Finding:
    prebuild = _bool_ini(project.ini("nsbox_prebuild"), True)
    if prebuild and probe.prebuild_supported():
        how = "ahead of each test by a builder process; the test " + (
            "forks straight into its sandbox (root)" if os.geteuid() == 0 else "enters it through one more fork (rootless)"
        )
    elif prebuild:
        how = "when each test starts (setns through a pidfd needs Linux 5.8)"
    else:
        how = "when each test starts, by a fork of pytest (ini nsbox_prebuild = false)"
    return Finding("info", "build", f"sandboxes are built {how}")


def diagnose(project: Project, environ: Mapping[str, str]) -> list[Finding]:
    """Everything doctor says, in order; the exit status follows from the FAILs."""
    user = cgroups.user_name()
    found = [
        Finding(
            "info",
            "pytest-nsbox",
            f"{__version__}; user {user} (uid {os.getuid()}); kernel {os.uname().release}; python {sys.version.split()[0]}",
        ),
        *settings(project, environ),
    ]
    try:
        defaults = defaults_from(project.ini)
    except NsboxError as exc:
        found.append(Finding("FAIL", "ini", str(exc), "fix the value: pytest stops with a usage error until then"))
        defaults = Defaults()
    else:
        found.append(Finding("info", "defaults", describe_defaults(defaults)))
    found += [_probe(p, "FAIL") for p in (probe.linux(), probe.userns(), probe.overlay_userns())]
    apparmor = apparmor_finding()
    if apparmor is not None:
        found.append(apparmor)
    root, source = probe.cgroup_root_setting(project.ini(probe.CGROUP_ROOT_INI), environ)
    found += cgroup_findings(root, source, defaults)
    found.append(cache_finding(project, defaults))
    found += [_probe(p, "WARN") for p in probe.optional_probes()]
    found.append(build_mode(project))
    return found


def exit_status(found: list[Finding]) -> int:
    return 1 if any(f.status == "FAIL" for f in found) else 0
