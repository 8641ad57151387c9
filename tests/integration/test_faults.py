"""Fail closed under faults: each setup step, made to fail, leaves the test unrun with the step named
and nothing behind (issue 12 item 4). The faults are injected with PYTEST_NSBOX_FAULT (box/faults.py)."""

from __future__ import annotations

import ast
import os
import re
import tempfile
from pathlib import Path

import pytest
from helpers import PID_FILE_CONFTEST, builders_of, cgroups_of, processes_with

from pytest_nsbox import reports
from pytest_nsbox.box import faults, mounts, subids

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]

BOX = Path(reports.__file__).resolve().parent / "box"
BOTH = ("prebuilt", "forked")
JOINER = "C" if os.geteuid() == 0 else "J"  # P's child that joins a prebuilt sandbox (see prebuilt.py)
FULL_IDS = subids.sandbox_ids().mapping  # None: one id mapped (rootless without subordinate ids)

# The kernel interface steps (mounts.kernel_interface_steps): their names are made from the paths.
MASK_STEPS: tuple[str, ...] = (
    *(mounts._step_name("readonly", p) for p in mounts.READONLY_PROC_PATHS),
    *(mounts._step_name("mask", p) for p in mounts.MASKED_PROC_PATHS + mounts.MASKED_SYS_PATHS),
)
HOST_SYS_MASK_STEPS: tuple[str, ...] = tuple(mounts._step_name("mask", p) for p in mounts.MASKED_HOST_SYS_PATHS)

# Every step a sandboxed test's setup runs, as PYTEST_NSBOX_FAULT names it, and the forms that run it.
# An unqualified name fails where it first runs: in A (forked) or B' (prebuilt) for the namespace steps.
STEP_FAULTS: dict[str, tuple[str, ...]] = {
    # P, before any fork (cgroups.py)
    "create_cgroup": BOTH,
    "write_cgroup_limits": BOTH,
    # A (forked) / B' (prebuilt): descriptors, cgroup, namespaces, id maps
    "set_parent_death_signal": BOTH,
    "close_inherited_fds": BOTH,
    "clear_environment": BOTH,  # B' before its setup (prebuilt), B after forking C (forked)
    "join_session_keyring": BOTH,  # B' (prebuilt), B (forked)
    "enter_cgroup": BOTH,
    "mount_proc_for_pid_namespace": ("prebuilt",),
    "unshare_namespaces": BOTH,
    # prebuilt: B' writes its maps, or asks the builder's worker to (a full range); forked: A writes
    # one id itself, or P writes a full range for it (as root, or with subordinate ids)
    "write_id_maps": BOTH if FULL_IDS is None else ("prebuilt",),
    **({} if FULL_IDS is None else {"map_subordinate_ids": ("forked",)}),
    # B / B': the mount plan (mounts.build_plan, for the host image and network="none")
    "B:set_parent_death_signal": ("forked",),
    "make_root_slave": BOTH,
    "mount_scratch_tmpfs": BOTH,
    "write_init_layer": BOTH,
    "mount_root_dir": BOTH,
    "make_host_tree": BOTH,
    "bind_host_path": BOTH,
    "mount_overlay": BOTH,
    "mount_tmp": BOTH,
    "mount_var_tmp": BOTH,
    "mount_run": BOTH,
    "mount_minimal_dev": BOTH,
    "mount_devpts": BOTH,
    "mount_dev_shm": BOTH,
    "link_dev": BOTH,
    "mount_proc": BOTH,
    "remount_readonly": BOTH,
    "make_mask_sources": BOTH,
    **dict.fromkeys(MASK_STEPS, BOTH),
    "mount_sysfs": BOTH,
    "pivot_root": BOTH,
    "set_hostname": BOTH,
    "bring_up_loopback": BOTH,
    "add_loopback_addresses": BOTH,
    "harden_init": BOTH,
    # C (or J) joining a prebuilt sandbox
    f"{JOINER}:set_parent_death_signal": ("prebuilt",),
    f"{JOINER}:close_inherited_fds": ("prebuilt",),
    f"{JOINER}:enter_cgroup": ("prebuilt",),
    f"{JOINER}:join_namespaces": ("prebuilt",),
    # C, the test process (steps.run_test)
    "verify_sandbox": BOTH,
    "drop_capabilities": BOTH,
    "C:join_session_keyring": BOTH,
    "drop_environment": BOTH,
    "prefer_test_for_oom": BOTH,
    "register_stack_dump": BOTH,
    "redirect_crash_dump": BOTH,
    "enter_working_directory": BOTH,
}

# Steps no pytest run of a marked test takes here, and why.
NOT_IN_A_TEST_RUN: dict[str, str] = {
    **({"map_subordinate_ids": "a full id range: not without subordinate ids (rootless)"} if FULL_IDS is None else {}),
    "mount_host_path_dir": "a throwaway host directory with mounts below it (none in the host image's plan here)",
    "make_links": "symlinks inside such a directory",
    **dict.fromkeys(HOST_SYS_MASK_STEPS, "the host's /sys bound read-only: network 'host' only"),
    "connect_network": "network='private' only: test_network.py makes it fail",
    "make_private_network": "network='private' only: test_network.py makes it fail",
    "write_hosts": "a private network with a service only: test_network.py makes it fail",
    "mount_scratch_dir": "scratch='disk' only: test_disk.py makes it fail",
}

CASES = [(mode, step) for step, forms in STEP_FAULTS.items() for mode in forms]

PLAN_STEPS_CONFTEST = """
def pytest_sessionfinish(session):
    from pytest_nsbox.plugin import RUNNER_KEY

    plans = session.config.stash[RUNNER_KEY].preparer._plans.values()
    open("plan-steps", "w").write(" ".join(step.name for plan in plans for step in plan.steps))
"""
BASETEMP = "shared"  # the inner run's basetemp: shared with the host, where the body leaves its marker
MARKER = "body-ran"
INNER_TEST = """
import pytest

# a cgroup, the OOM preference, the stack dump and drop_environment
@pytest.mark.nsbox(memory="256M", timeout=120, drop_env=["NSBOX_FAULTS_NOT_SET"])
def test_body():
    open({marker!r}, "w").write("the body ran")
"""


def step_names_in_code() -> set[str]:
    """Step names written in the mechanism's code: ("name", action) pairs and the fault hook's calls in
    box/*.py, and the names of the mount plan's steps in mounts.py (dataclass defaults and the first
    argument of a step built with a name)."""
    names: set[str] = set()
    step_classes = {"MountFs", "BindScratchDir", "MakeTree"}
    for path in sorted(set(BOX.glob("*.py")) - {BOX / "_linux.py"}):  # _linux: ctypes fields, no steps
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Tuple) and len(node.elts) == 2:
                first, action = node.elts
                if (
                    isinstance(first, ast.Constant)
                    and isinstance(first.value, str)
                    and isinstance(action, ast.Lambda | ast.Attribute | ast.Name)
                ):
                    names.add(first.value)
            elif isinstance(node, ast.Call):
                func = node.func
                callee = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                args = node.args
                if callee == "inject" and len(args) == 2 and isinstance(args[1], ast.Constant):
                    names.add(args[1].value)  # faults.inject(process, step)
                if callee == "_inject_fault" and args and isinstance(args[0], ast.Constant):
                    names.add(args[0].value)  # cgroups._inject_fault(step, attempted): P's steps
                if callee in step_classes and args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                    names.add(args[0].value)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "name":
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    names.add(node.value.value)
    return names


def test_every_step_in_the_code_has_a_fault_test() -> None:
    covered = {step.rpartition(":")[2] for step in STEP_FAULTS}
    found = step_names_in_code() | set(MASK_STEPS) | set(HOST_SYS_MASK_STEPS)
    assert {"unshare_namespaces", "pivot_root", "mount_proc", "join_namespaces", "harden_init"} <= found  # the scan works
    assert found - covered - set(NOT_IN_A_TEST_RUN) == set()  # a new step needs a line in STEP_FAULTS
    assert covered - found == set()  # and a step that is gone, none


def run_leftovers(pytester: pytest.Pytester, pid: str, mounts_before: set[str]) -> list[str]:
    """What a finished inner run left on the host: cgroups, scratch dirs, mounts, processes."""
    left = [f"cgroup {c}" for c in cgroups_of(pid)]
    left += [f"scratch dir {n}" for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"pytest-nsbox-{pid}-")]
    new_mounts = set(Path("/proc/self/mountinfo").read_text().splitlines()) - mounts_before
    left += [f"mount {m}" for m in new_mounts if "nsbox" in m or str(pytester.path) in m]
    left += [f"process {p}" for p in processes_with(str(pytester.path)) + builders_of(pid)]
    return left


@pytest.mark.parametrize(("build_mode", "step"), CASES)
def test_a_failed_step_leaves_the_test_unrun(
    run_inner, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, build_mode: str, step: str
) -> None:
    marker = pytester.path / BASETEMP / MARKER
    mounts_before = set(Path("/proc/self/mountinfo").read_text().splitlines())
    monkeypatch.setenv(faults.FAULT_ENV, step)
    result = run_inner(INNER_TEST.format(marker=str(marker)), f"--basetemp={BASETEMP}", conftest=PID_FILE_CONFTEST)
    name = step.rpartition(":")[2]
    if name == "verify_sandbox":  # the inside check is a refusal, never a skip
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines([f"*{reports.NOT_INSIDE.format(message='*' + faults.FAULT_MESSAGE)}*"])
    else:
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines([f"SKIPPED*step {name} failed*{faults.FAULT_MESSAGE}*"])
    assert not marker.exists()
    assert run_leftovers(pytester, (pytester.path / "pid").read_text(), mounts_before) == []


@pytest.mark.parametrize("build_mode", BOTH)
def test_without_a_fault_the_body_runs(
    run_inner, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, build_mode: str
) -> None:
    """The control: the same inner test, no fault, writes its marker. Every step of its mount plan
    (some names are made at run time) has a fault test."""
    marker = pytester.path / BASETEMP / MARKER
    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    result = run_inner(INNER_TEST.format(marker=str(marker)), f"--basetemp={BASETEMP}", conftest=PLAN_STEPS_CONFTEST)
    result.assert_outcomes(passed=1)
    assert marker.read_text() == "the body ran"
    plan_steps = set((pytester.path / "plan-steps").read_text().split())
    assert "pivot_root" in plan_steps
    assert plan_steps - {step for step, forms in STEP_FAULTS.items() if build_mode in forms} == set()


@pytest.mark.parametrize("step", ["unshare_namespaces", "pivot_root", "write_cgroup_limits"])
@pytest.mark.parametrize("build_mode", BOTH)
def test_a_failed_step_is_an_error_under_require(
    run_inner, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, build_mode: str, step: str
) -> None:
    marker = pytester.path / BASETEMP / MARKER
    monkeypatch.setenv(faults.FAULT_ENV, step)
    result = run_inner(INNER_TEST.format(marker=str(marker)), f"--basetemp={BASETEMP}", "--nsbox-require")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*step {step} failed*{faults.FAULT_MESSAGE}*{reports.REQUIRE_NOTE.strip()}*"])
    assert not marker.exists()


def test_a_fault_names_one_process_or_every_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook's grammar: STEP anywhere, PROCESS:STEP in that process only; it only ever raises."""
    assert faults._parse("pivot_root") == (None, "pivot_root")
    assert faults._parse("C:enter_cgroup") == ("C", "enter_cgroup")
    assert faults._parse(" ") is None
    monkeypatch.setattr(faults, "_FAULT", ("C", "enter_cgroup"))
    faults.inject("B", "enter_cgroup")
    with pytest.raises(OSError, match=re.escape(faults.FAULT_MESSAGE)):
        faults.inject("C", "enter_cgroup")
