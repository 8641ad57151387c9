"""Everything a sandbox needs before any fork: spec → image → mount plan → cgroup.

``Preparer.prepare(item)`` returns a ``Prepared`` (all of it) or a ``Refused`` (why the item
gets no sandbox: an invalid marker or image, or a sandbox or limit this host cannot give).
Images, plans and probes are computed once per session.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import pytest

from . import compat, images, probe
from .box import cgroups, diskscratch, mounts, subids
from .box.config import SandboxConfig
from .box.network import NETEM_FIX, NETEM_MISSING, LinkFaults, NetworkError, Plumbing
from .errors import NsboxError
from .images import cache as layer_cache
from .images.config import environment_for_tests
from .project import cache_dir_setting
from .spec import (
    DEFAULT_PIDS,
    Defaults,
    Mark,
    Network,
    SandboxSpec,
    SpecError,
    check_expected_limits,
    format_size,
    network_mode,
    spec_from_markers,
)

log = logging.getLogger(__name__)

MARKER: Final = "nsbox"
LIMITS_UNAVAILABLE: Final = "nsbox: cannot enforce the requested limits ({names}): {reason}{fix}"
PLAN_FAILED: Final = "nsbox: could not plan the sandbox's mounts: {error}"
NO_HIERARCHY: Final = probe.NO_CGROUP_HIERARCHY
# what a sandboxed test loses where no cgroup can be had (see Preparer.defaults_off)
PIDS_CAP_OFF: Final = f"the default pids cap ({DEFAULT_PIDS}) of sandboxed tests"
MEMORY_REPORT_OFF: Final = "the peak-memory report"
IMAGE_FAILED: Final = "nsbox: {error} (test {nodeid})"
NO_PRIVATE_NETWORK: Final = "nsbox: network='private' is unavailable here: {error}"
NO_NETEM: Final = "nsbox: {network!r} is unavailable here: {missing}; {fix}"
DEFAULT_DISK_FLOOR: Final = 256 * 2**20  # the default disk bound on a machine with little memory free
NO_DISK_SCRATCH: Final = "nsbox: scratch='disk' is unavailable here: {error} (test {nodeid})"
DISK_SCRATCH_SEEN: Final = (
    "the directory for disk scratches, {base}, would be visible inside the sandbox ({why}). "
    "Hint: set TMPDIR to a directory sandboxes do not see, e.g. /var/tmp (the default) or /tmp"
)
DISK_SCRATCH_FULL: Final = (
    "nsbox: disk limit of {limit} cannot be had on disk: {path} has {free} free (test {nodeid}). "
    "Hint: free some space, give a smaller disk=..., or set TMPDIR to a directory on a larger disk"
)


@dataclass(frozen=True, slots=True)
class Prepared:
    """An item's sandbox, ready to be built: its spec, mount plan and cgroup (owned from now on)."""

    spec: SandboxSpec
    plan: mounts.MountPlan
    cgroup: cgroups.Cgroup | None
    image: images.ResolvedImage | None = None
    scratch_dir: str | None = None  # scratch="disk": the sandbox's own directory on the host's disk (see box/diskscratch.py)

    def environment(self) -> dict[str, str]:
        """What the test sets over pytest's environment: the image's Env (see images.config)."""
        if self.image is None or self.image.config is None:
            return {}
        return environment_for_tests(self.image.config)

    def config(self) -> SandboxConfig:
        """The sandbox's config, with the current working directory (read now: wider-scoped
        fixtures may have changed it)."""
        return SandboxConfig.create(
            self.plan,
            network_mode(self.spec.network),
            os.getcwd(),
            cgroup_files=self.cgroup.join_files if self.cgroup is not None else (),
            oom_first=self.cgroup is not None and self.spec.memory is not None,
            id_mapping=subids.sandbox_ids().mapping,
            drop_env=self.spec.drop_env or (),
            scratch_dir=self.scratch_dir,
        )

    def plumbing(self) -> Plumbing | None:
        """What the private network's process does for the sandbox (None: not on it)."""
        if network_mode(self.spec.network) != "private":
            return None
        return Plumbing(link_faults(self.spec.network))

    def discard(self) -> None:
        """The sandbox will not run: empty and release its cgroup."""
        if self.cgroup is not None:
            self.cgroup.discard()  # the processes of a sandbox built for it may still be on their way out
        if self.scratch_dir is not None:
            try:
                diskscratch.remove_tree(self.scratch_dir)
            except (OSError, RuntimeError) as exc:  # the run's directory takes it along at the end
                log.debug("nsbox: could not remove %s: %s", self.scratch_dir, exc)


@dataclass(frozen=True, slots=True)
class Refused:
    """Why an item gets no sandbox. *unavailable*: the host cannot give it (SKIPPED, or ERROR
    under --nsbox-require); otherwise the item's own values are invalid (ERROR)."""

    message: str
    unavailable: bool


def link_faults(network: object) -> LinkFaults:
    """The faults a spec's network asks for on its link (none but for a Network(...))."""
    if isinstance(network, Network):
        return LinkFaults(network.delay_us, network.jitter_us, network.loss_percent, network.rate_bits)
    return LinkFaults()


class _NoRoom(Exception):
    """The disk scratch's filesystem has less free space than the disk bound (the message says so)."""


class LimitsUnavailable(NsboxError):
    """Requested limits cannot be enforced here; the message says which, why and the fix."""


def marks_of(item: pytest.Item) -> list[Mark]:
    """The item's nsbox markers, each with its level: 0 on the test itself (decorators and
    parametrize marks), 1 on its parent (a class), and so on outwards."""
    levels = {id(node): level for level, node in enumerate(item.listchain()[::-1])}
    return [Mark(m.args, m.kwargs, levels.get(id(node), 0)) for node, m in item.iter_markers_with_node(MARKER)]


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


def _own_home() -> str | None:
    """The caller's home directory if the caller owns it (a rootless sandbox can write there)."""
    home = pwd.getpwuid(os.getuid()).pw_dir
    try:
        return home if os.stat(home).st_uid == os.getuid() else None
    except OSError:
        return None


def default_disk_bound() -> int:
    """The disk bound of a test that sets none: half the memory available now (the machine's
    MemAvailable, or what pytest's own cgroup may still use if that is less), divided among the
    run's xdist workers, in whole MiB; never less than DEFAULT_DISK_FLOOR."""
    available = memory_available()
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    bound = available // 2 // workers // 2**20 * 2**20
    return max(bound, DEFAULT_DISK_FLOOR)


def default_disk_bound_on_disk(path: str) -> int:
    """The disk bound of a test with scratch="disk" that sets none: half the free space of the
    filesystem of *path* now, divided among the run's xdist workers, in whole MiB; never less
    than DEFAULT_DISK_FLOOR (a filesystem with less free refuses the sandbox)."""
    try:
        free = diskscratch.free_space(path)
    except OSError:
        return DEFAULT_DISK_FLOOR
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    return max(free // 2 // workers // 2**20 * 2**20, DEFAULT_DISK_FLOOR)


def memory_available() -> int:
    """What pytest may still use: the machine's MemAvailable, or its cgroup's headroom if less."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return 2 * DEFAULT_DISK_FLOOR
    own = cgroups.own_memory_headroom()
    return min(available, own) if own is not None else available


def memory_total() -> int:
    """The machine's MemTotal (unknown: 2**62)."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        total = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemTotal:"))) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return 2**62
    return total


def _check_unseen(base: str, image: images.Resolved, plan: mounts.MountPlan) -> None:
    """OSError if the disk scratches' directory *base* is visible inside a sandbox of *plan*:
    through a host path it shows (the rootdir, cwd, basetemp...) or, image "host", anywhere
    but the fresh and replaced directories (other sandboxes' scratches would be readable)."""
    real = os.path.realpath(base)
    for hp in plan.host_paths:
        path = os.path.realpath(hp.path)
        if real == path or real.startswith(path.rstrip("/") + "/"):
            raise diskscratch.DiskScratchError(
                errno.EINVAL, DISK_SCRATCH_SEEN.format(base=base, why=f"below {hp.path}, which it shows")
            )
    if image == images.HOST and not mounts.under_fresh_or_replaced(real):
        why = "image 'host' shows the host's directories but /tmp, /var/tmp, /run, /dev, /proc, /sys"
        raise diskscratch.DiskScratchError(errno.EINVAL, DISK_SCRATCH_SEEN.format(base=base, why=why))


class Preparer:
    """Session state for preparing sandboxes: defaults, resolved images, plans, the cgroup manager."""

    def __init__(self, config: pytest.Config, defaults: Defaults, *, cgroup_root: str = "", cache_dir: str = "") -> None:
        self.config = config
        self.defaults = defaults
        self.cgroup_root = cgroup_root
        self.cache_dir = cache_dir_setting(cache_dir, config.rootpath)
        self._images: dict[str, images.ResolvedImage] = {}
        self._plans: dict[tuple[images.Resolved, str, str, int | None, bool], mounts.MountPlan] = {}
        self._scratch: str | None = None
        self._manager: cgroups.CgroupManager | None = None
        self._manager_detected = False
        self._availability: dict[tuple[str, ...], cgroups.Availability] = {}
        self._cache_hold: layer_cache.InUse | None = None  # while layers may be built or mounted
        self.default_disk = default_disk_bound()
        self._default_disk_on_disk: int | None = None
        self._disk_run: diskscratch.RunDir | None = None  # scratch="disk": this process's directory
        diskscratch.sweep_stale()  # what killed runs left, whether this run uses a disk scratch or not
        self.defaults_off: dict[str, str] = {}  # what a sandboxed test lost for want of a cgroup: reason
        # the run's private network (the runner sets it: it needs the builder); raises NetworkError
        self.network: Callable[[], Any] | None = None

    def close(self) -> None:
        if self._cache_hold is not None:
            self._cache_hold.release()
            self._cache_hold = None
        if self._manager is not None:
            self._manager.close()
        if self._disk_run is not None:
            try:
                self._disk_run.close()
            except (OSError, RuntimeError) as exc:  # the next run's sweep removes it
                log.debug("nsbox: could not remove the run's disk scratch: %s", exc)
            self._disk_run = None
        if self._scratch is not None:
            try:
                os.rmdir(self._scratch)
            except OSError:
                pass
            self._scratch = None

    # --- one item -----------------------------------------------------------------------------

    def prepare(self, item: pytest.Item, *, ahead: bool = False, spare: Prepared | None = None) -> Prepared | Refused | None:
        """The item's sandbox, or why it gets none; *spare* itself if it has the item's spec.

        *ahead* (while another test runs): None instead of resolving an image not resolved yet,
        which may mean a long build that must not delay the running test's timeout.
        """
        try:
            spec = self.spec_for(item)
        except SpecError as exc:
            return Refused(str(exc), unavailable=False)
        if spare is not None and spare.spec == spec:
            return spare
        if ahead and spec.image != images.HOST and spec.image not in self._images:
            return None
        return self.prepare_spec(spec, f"test {item.nodeid}")

    def prepare_spec(self, spec: SandboxSpec, label: str) -> Prepared | Refused:
        """A sandbox for *spec* (a test's, or a service's: *label* names it in messages)."""
        if not probe.linux().ok:
            return Refused(probe.linux().describe(), unavailable=True)
        try:
            image = self.resolve_image(spec.image)
            plan = self.plan(image.root, network_mode(spec.network), spec.disk, on_disk=spec.scratch == "disk")
        except images.ImageError as exc:
            return Refused(IMAGE_FAILED.format(error=exc, nodeid=label.removeprefix("test ")), unavailable=False)
        except OSError as exc:
            return Refused(PLAN_FAILED.format(error=exc), unavailable=True)
        refused = self._check_network(spec)
        if refused is not None:
            return refused
        scratch_dir = None
        if plan.on_disk:
            try:
                _check_unseen(diskscratch.base_dir(), image.root, plan)
                scratch_dir = self.new_scratch_dir(spec.disk, label)
            except OSError as exc:
                error = exc.strerror if isinstance(exc, diskscratch.DiskScratchError) else exc  # no "[Errno 22]"
                return Refused(NO_DISK_SCRATCH.format(error=error, nodeid=label.removeprefix("test ")), unavailable=False)
            except _NoRoom as exc:
                return Refused(str(exc), unavailable=False)
        try:
            cgroup = self.cgroup_for(spec)
        except LimitsUnavailable as exc:
            if scratch_dir is not None:
                diskscratch.remove_tree(scratch_dir)
            return Refused(str(exc), unavailable=True)
        return Prepared(spec, plan, cgroup, image, scratch_dir)

    def new_scratch_dir(self, bound: int | None, label: str) -> str:
        """A directory on the host's disk for one sandbox's scratch (OSError: none can be made;
        _NoRoom: its filesystem has less free space than *bound*)."""
        if self._disk_run is None:
            self._disk_run = diskscratch.RunDir()
        if bound is not None:
            free = diskscratch.free_space(self._disk_run.path)
            if free < bound:
                raise _NoRoom(
                    DISK_SCRATCH_FULL.format(
                        limit=format_size(bound),
                        path=self._disk_run.path,
                        free=format_size(free),
                        nodeid=label.removeprefix("test "),
                    )
                )
        return self._disk_run.new()

    def _check_network(self, spec: SandboxSpec) -> Refused | None:
        """Why the private network *spec* asks for cannot be had here (a SKIP), or None."""
        if network_mode(spec.network) != "private":
            return None
        try:
            if self.network is None:
                raise NetworkError("no sandbox builder")
            host = self.network()
        except NetworkError as exc:
            return Refused(NO_PRIVATE_NETWORK.format(error=exc), unavailable=True)
        if isinstance(spec.network, Network) and spec.network.needs_netem and not host.netem:
            return Refused(NO_NETEM.format(network=spec.network, missing=NETEM_MISSING, fix=NETEM_FIX), unavailable=True)
        return None

    def another(self, prepared: Prepared) -> Prepared | None:
        """A second sandbox like *prepared* (a cgroup of its own), or None if none can be had."""
        scratch_dir = None
        try:
            if prepared.plan.on_disk:
                scratch_dir = self.new_scratch_dir(prepared.spec.disk, "a spare sandbox")
            return Prepared(prepared.spec, prepared.plan, self.cgroup_for(prepared.spec), prepared.image, scratch_dir)
        except (LimitsUnavailable, OSError, _NoRoom):
            if scratch_dir is not None:
                diskscratch.remove_tree(scratch_dir)
            return None

    def spec_for(self, item: pytest.Item) -> SandboxSpec:
        """The item's spec: its markers over the defaults, a hook's changes, the default disk bound."""
        spec = spec_from_markers(marks_of(item), item.nodeid, self.defaults)
        if self.config.hook.pytest_nsbox_modify_spec.get_hookimpls():  # item.ihook costs a conftest lookup per item
            changed: SandboxSpec | None = item.ihook.pytest_nsbox_modify_spec(item=item, spec=spec)
            if changed is not None:
                check_expected_limits(changed, f"spec of {item.nodeid} from pytest_nsbox_modify_spec")
                spec = changed
        return spec if spec.disk is not None else replace(spec, disk=self.default_disk_for(spec.scratch))

    def default_disk_for(self, scratch: str) -> int:
        """The built-in disk bound: from the memory available (scratch "memory"), or from the free
        space of the disk scratch's filesystem (scratch "disk"), read once per session."""
        if scratch != "disk":
            return self.default_disk
        if self._default_disk_on_disk is None:
            self._default_disk_on_disk = default_disk_bound_on_disk(diskscratch.base_dir())
        return self._default_disk_on_disk

    def check_spec(self, item: pytest.Item) -> str | None:
        """Why the item's markers are invalid, or None."""
        try:
            self.spec_for(item)
        except SpecError as exc:
            return str(exc)
        return None

    def describe_cgroups(self) -> str:
        """'cgroup v1', 'cgroup v2' or 'no cgroups' (for the header; creates nothing)."""
        manager = self._manager if self._manager_detected else cgroups.detect(self.cgroup_root)
        return f"cgroup v{manager.version}" if manager is not None else "no cgroups"

    def resolve_image(self, name: str) -> images.ResolvedImage:
        """The image's root and config; one a plugin's pytest_nsbox_resolve_image gives has no config."""
        hooked = self.config.hook.pytest_nsbox_resolve_image(config=self.config, name=name)
        if hooked is not None:
            return images.ResolvedImage(str(hooked))
        if name not in self._images:
            if name != images.HOST and self._cache_hold is None:
                try:
                    self._cache_hold = layer_cache.InUse(self.cache_dir)  # nsbox images prune/rm wait for the run
                except OSError as exc:
                    raise images.ImageError(f"image {name!r}: cannot use the image cache {self.cache_dir}: {exc}") from None
            image_dirs = [str(d) for d in self.config.getini("nsbox_image_dirs")]
            self._images[name] = images.resolve(name, self.config.rootpath, self.cache_dir, image_dirs)
        return self._images[name]

    def plan(self, image: images.Resolved, network: str, disk: int | None, *, on_disk: bool = False) -> mounts.MountPlan:
        """The mount plan for *image*, *network* and the *disk* bound from the current directory
        (cached); *on_disk*: the scratch is a directory on the host's disk (scratch="disk")."""
        cwd = os.getcwd()
        key = (image, network, cwd, disk, on_disk)
        if key not in self._plans:
            self._plans[key] = mounts.build_plan(
                image=image,
                network=network,
                scratch=self.scratch(),
                host_paths=mounts.sandbox_paths(
                    interpreter=interpreter_paths(),
                    rootdir=str(self.config.rootpath),
                    cwd=cwd,
                    basetemp=compat.basetemp(self.config) or None,
                    home=_own_home() if os.getuid() != 0 and image == images.HOST else None,
                ),
                mounts=mounts.MountTable.read(),
                stacks_dir=str(layer_cache.stacks_dir(self.cache_dir)),
                disk=disk,
                on_disk=on_disk,
            )
        return self._plans[key]

    def scratch(self) -> str:
        if self._scratch is None:
            self._scratch = mounts.make_scratch_dir()
        return self._scratch

    # --- cgroups ------------------------------------------------------------------------------

    def cgroup_manager(self) -> cgroups.CgroupManager | None:
        if not self._manager_detected:
            self._manager = cgroups.detect(self.cgroup_root)
            if self._manager is not None:
                self._manager.sweep()
            self._manager_detected = True
        return self._manager

    def cgroup_for(self, spec: SandboxSpec) -> cgroups.Cgroup | None:
        """The sandbox's cgroup, with the requested limits plus the defaults (a pids cap, memory
        accounting) wherever the host allows. None if none is needed or only defaults could not
        be had; LimitsUnavailable if a requested limit cannot be enforced."""
        requested = cgroups.Limits(memory=spec.memory, pids=spec.pids, cpus=spec.cpus).controllers()
        manager = self.cgroup_manager()
        if manager is None:
            if not requested:
                self._lost(["pids", "memory"], NO_HIERARCHY)
                return None
            raise LimitsUnavailable(LIMITS_UNAVAILABLE.format(names=", ".join(requested), reason=NO_HIERARCHY, fix=""))
        defaults = cgroups.Limits(memory=spec.memory, pids=spec.pids or DEFAULT_PIDS, cpus=spec.cpus, account_memory=True)
        wanted = defaults.controllers()
        if not self._available(manager, wanted).ok:
            if any(not self._available(manager, [c]).ok for c in requested):
                problem = self._available(manager, requested)
                fix = f". Hint: {problem.fix}" if problem.fix else ""
                raise LimitsUnavailable(LIMITS_UNAVAILABLE.format(names=", ".join(requested), reason=problem.reason, fix=fix))
            for controller in wanted:
                if not self._available(manager, [controller]).ok:
                    self._lost([controller], self._available(manager, [controller]).reason)
            wanted = [c for c in wanted if self._available(manager, [c]).ok]
        limits = cgroups.Limits(
            memory=spec.memory,
            pids=(spec.pids or DEFAULT_PIDS) if "pids" in wanted else None,
            cpus=spec.cpus,
            account_memory="memory" in wanted,
            oom_group="memory" not in spec.expect_limits,  # an expected OOM kill ends only its victim
        )
        if not limits.controllers():
            return None
        try:
            return manager.create(limits)
        except cgroups.CgroupError as exc:
            if requested:
                raise LimitsUnavailable(LIMITS_UNAVAILABLE.format(names=", ".join(requested), reason=str(exc), fix="")) from None
            log.debug("nsbox: default limits not applied: %s", exc)
            self._lost(limits.controllers(), str(exc))
            return None

    def _lost(self, controllers: list[str], reason: str) -> None:
        """Note which defaults a sandboxed test went without (the run's one notice lists them)."""
        for controller, what in (("pids", PIDS_CAP_OFF), ("memory", MEMORY_REPORT_OFF)):
            if controller in controllers:
                self.defaults_off.setdefault(what, reason)

    def _available(self, manager: cgroups.CgroupManager, controllers: list[str]) -> cgroups.Availability:
        """Whether *controllers* can be had, probed once per session."""
        key = tuple(controllers)
        if key not in self._availability:
            self._availability[key] = manager.check(controllers)
        return self._availability[key]
