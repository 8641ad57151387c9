"""Rootless guidance: the texts of doctor and the cgroup checks (AppArmor, v2 delegation, v1 hand-over),
the FAIL/WARN rule, and the run's one notice — against fakes of the sysctls and of a cgroupfs tree."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pytest_nsbox import doctor, plugin, prepare, probe
from pytest_nsbox.box import cgroups
from pytest_nsbox.spec import Defaults, defaults_from

NOBODY = 65534  # a real user of /etc/passwd whose name the fixes must name


@pytest.fixture
def as_nobody(monkeypatch: pytest.MonkeyPatch) -> str:
    """Texts as the unprivileged user 'nobody' would get them (only getuid is faked)."""
    import pwd

    monkeypatch.setattr(os, "getuid", lambda: NOBODY)
    return pwd.getpwuid(NOBODY).pw_name


def fake_sysctls(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    names = {name.replace(".", "_"): name for name in probe.SYSCTLS}
    settings = {names[key]: value for key, value in values.items()}
    monkeypatch.setattr(probe, "read_sysctl", lambda name: settings.get(name))


def test_apparmor_is_blamed_only_when_its_sysctl_is_set(monkeypatch: pytest.MonkeyPatch, as_nobody: str) -> None:
    fake_sysctls(monkeypatch, kernel_apparmor_restrict_unprivileged_userns="1", user_max_user_namespaces="15000")
    hint = probe.userns_hint()
    python = os.path.realpath(sys.executable)
    assert "kernel.apparmor_restrict_unprivileged_userns = 1" in hint
    assert f"profile pytest-nsbox {python} flags=(unconfined) {{ userns," in hint
    assert f"apparmor_parser -r {probe.APPARMOR_PROFILE}" in hint
    assert "'sysctl -w kernel.apparmor_restrict_unprivileged_userns=0'" in hint
    assert "for every program" in hint and f"only {python} and what it runs" in hint  # what each fix means
    fake_sysctls(monkeypatch, kernel_apparmor_restrict_unprivileged_userns="0", user_max_user_namespaces="15000")
    assert "AppArmor" not in probe.userns_hint()
    fake_sysctls(monkeypatch, user_max_user_namespaces="15000")  # no AppArmor at all
    assert "AppArmor" not in probe.userns_hint()


def test_v1_fix_names_the_real_user_and_the_real_paths(as_nobody: str) -> None:
    fix = cgroups.v1_fix("ci-root", ["memory", "pids"])
    dirs = "/sys/fs/cgroup/memory/ci-root /sys/fs/cgroup/pids/ci-root"
    assert f"as root, once: mkdir -p {dirs} && chown -R {as_nobody}: {dirs}" in fix
    assert "nsbox_cgroup_root = ci-root" in fix and "$USER" not in fix


def test_v1_fix_for_the_default_root_hands_over_a_root_of_the_users_own(as_nobody: str) -> None:
    fix = cgroups.ManagerV1(cgroups.DEFAULT_ROOT_NAME).fix(["memory"])
    assert f"chown -R {as_nobody}: " in fix and f"nsbox_cgroup_root = pytest-nsbox-{as_nobody} " in fix
    assert cgroups.ManagerV1("ci-root").fix(["memory"]).endswith("(or env PYTEST_NSBOX_CGROUP_ROOT=ci-root)")


def test_v2_fix_is_delegation_by_systemd_or_by_root(as_nobody: str) -> None:
    fix = cgroups.v2_fix()
    assert f"'systemd-run --user --scope -p Delegate=yes {os.path.realpath(sys.executable)} -m pytest ...'" in fix
    tree = f"/sys/fs/cgroup/nsbox-{as_nobody}"
    assert f"chown {as_nobody}: {tree} {tree}/cgroup.procs {tree}/cgroup.subtree_control {tree}/cgroup.threads" in fix
    assert f"set ini nsbox_cgroup_root = nsbox-{as_nobody}" in fix and "$USER" not in fix
    assert cgroups.v2_fix(configured=True).index("as root, once") < cgroups.v2_fix(configured=True).index("systemd-run")


@pytest.fixture
def fake_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cgroup2 tree: pytest in /user/pytest, /user delegated memory and pids (not enabled yet)."""
    monkeypatch.setattr(cgroups, "CGROUP_MOUNT", tmp_path)
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.procs").write_text("1\n")
    user = tmp_path / "user"
    (user / "pytest").mkdir(parents=True)
    (user / "cgroup.controllers").write_text("memory pids\n")
    (user / "cgroup.subtree_control").write_text("")
    (user / "cgroup.procs").write_text("")
    (user / "pytest" / "cgroup.procs").write_text("4242\n")
    return user


def test_v2_dry_run_changes_nothing_and_says_what_a_run_enables(fake_v2: Path) -> None:
    manager = cgroups.ManagerV2(fake_v2, own="/user/pytest")
    result = manager.check(["memory", "pids"], dry_run=True)
    assert result.ok and result.note == f"a run enables +memory +pids in {fake_v2}/cgroup.subtree_control"
    assert (fake_v2 / "cgroup.subtree_control").read_text() == ""
    assert manager.check(["memory", "pids"]).ok  # a run enables them
    assert (fake_v2 / "cgroup.subtree_control").read_text() == "+memory +pids"


def test_v2_controller_not_delegated(fake_v2: Path, as_nobody: str) -> None:
    result = cgroups.ManagerV2(fake_v2, own="/user/pytest").check(["cpu"], dry_run=True)
    assert not result.ok
    assert result.reason == f"controllers cpu are not delegated to {fake_v2} (its cgroup.controllers: memory pids)"
    assert "systemd-run --user --scope -p Delegate=yes" in result.fix


def test_v2_root_with_processes_of_its_own_cannot_enable_controllers(fake_v2: Path) -> None:
    (fake_v2 / "cgroup.procs").write_text("77\n")
    result = cgroups.ManagerV2(fake_v2, own="/user").check(["memory"], dry_run=True)
    assert not result.ok and "has processes of its own" in result.reason and "(EBUSY)" in result.reason


def test_v2_configured_root_outside_pytests_cgroup(fake_v2: Path, tmp_path: Path) -> None:
    (tmp_path / "cgroup.procs").unlink()  # the common ancestor's cgroup.procs: not writable here
    other = tmp_path / "other"
    other.mkdir()
    (other / "cgroup.controllers").write_text("memory pids\n")
    (other / "cgroup.subtree_control").write_text("memory pids\n")
    result = cgroups.ManagerV2(other, configured=True, own="/user/pytest").check(["memory"], dry_run=True)
    assert not result.ok
    assert result.reason.startswith(f"pytest's cgroup {tmp_path}/user/pytest is outside {other}: moving a sandbox there")
    assert result.fix.startswith("as root, once")
    missing = cgroups.ManagerV2(tmp_path / "absent", configured=True, own="/user/pytest").check(["memory"], dry_run=True)
    assert "does not exist, and pytest-nsbox does not create it" in missing.reason


@pytest.mark.parametrize(
    ("ini", "env", "expected"),
    [
        ("from-ini", "from-env", ("from-ini", "ini nsbox_cgroup_root")),
        ("", "from-env", ("from-env", "env PYTEST_NSBOX_CGROUP_ROOT")),
        ("  ", " ", ("", "default")),
    ],
)
def test_cgroup_root_precedence_is_ini_then_env(ini: str, env: str, expected: tuple[str, str]) -> None:
    assert probe.cgroup_root_setting(ini, {probe.CGROUP_ROOT_ENV: env}) == expected


class FakeManager(cgroups.CgroupManager):
    """Every controller refused, with one reason."""

    version = 1

    def check(self, controllers: list[str], *, dry_run: bool = False) -> cgroups.Availability:
        assert dry_run, "doctor must not change anything"
        return cgroups.Availability(False, "REASON", "FIX")

    def create(self, limits: cgroups.Limits) -> cgroups.Cgroup:
        raise AssertionError("doctor creates no cgroup where the check fails")

    def roots(self) -> list[Path]:
        return [Path("/sys/fs/cgroup/fake")]


@pytest.mark.parametrize(
    ("root", "ini", "expected"),
    [
        ("", {}, {"memory": "WARN", "pids": "WARN", "cpu": "WARN"}),  # nothing configured: optional
        ("", {"nsbox_memory": "64M"}, {"memory": "FAIL", "pids": "WARN", "cpu": "WARN"}),
        ("ci-root", {}, {"memory": "FAIL", "pids": "FAIL", "cpu": "WARN"}),  # a configured root
        ("", {"nsbox_cpus": "0.5"}, {"memory": "WARN", "pids": "WARN", "cpu": "FAIL"}),
    ],
)
def test_doctor_fails_only_what_the_configuration_needs(
    monkeypatch: pytest.MonkeyPatch, root: str, ini: dict[str, str], expected: dict[str, str]
) -> None:
    monkeypatch.setattr(cgroups, "detect", lambda setting: FakeManager())
    defaults = defaults_from(lambda name: ini.get(name, ""))
    found = doctor.cgroup_findings(root, "env PYTEST_NSBOX_CGROUP_ROOT", defaults)
    statuses = {f.what.split()[2]: f.status for f in found if f.what.startswith("cgroup v1 ")}
    assert statuses == expected
    assert all(f.fix == "FIX" for f in found if f.status != "info")
    assert doctor.exit_status(found) == (1 if "FAIL" in expected.values() else 0)


def test_doctor_without_any_cgroup_hierarchy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "detect", lambda setting: None)
    (finding,) = doctor.cgroup_findings("", "default", Defaults())
    assert finding.status == "WARN" and "default pids cap" in finding.detail and finding.fix == doctor.NO_HIERARCHY_FIX
    (finding,) = doctor.cgroup_findings("", "default", defaults_from(lambda name: "64M" if name == "nsbox_memory" else ""))
    assert finding.status == "FAIL"


def test_the_notice_says_which_defaults_are_off() -> None:
    both = plugin.defaults_off_notice({prepare.MEMORY_REPORT_OFF: "REASON", prepare.PIDS_CAP_OFF: "REASON"})
    assert both == (
        "nsbox: no cgroup could be had for sandboxed tests: REASON. So the default pids cap (1024) of sandboxed tests "
        "and the peak-memory report are off; `nsbox doctor` says how to get them"
    )
    one = plugin.defaults_off_notice({prepare.MEMORY_REPORT_OFF: "REASON"})
    assert one.endswith("So the peak-memory report is off; `nsbox doctor` says how to get it")


def test_a_fix_is_printed_once_for_findings_in_a_row() -> None:
    found = [doctor.Finding("WARN", "a", "x", "FIX"), doctor.Finding("WARN", "b", "y", "FIX"), doctor.Finding("ok", "c", "ok")]
    assert doctor.render(found) == ["WARN  a: x", "      fix: FIX", "WARN  b: y", "      fix: as above", "ok    c: ok"]
