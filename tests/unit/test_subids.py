"""Subordinate id ranges: parsing /etc/subuid and /etc/subgid, and saying exactly what is missing."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from pytest_nsbox.box import subids
from pytest_nsbox.box.config import SandboxConfig
from pytest_nsbox.box.mounts import MountPlan
from pytest_nsbox.box.steps import unshare_steps

SUBUID = """\
# comment
other:100000:65536

alice:165536:65536
alice:300000:1000
broken line
alice:x:65536
1234:400000:70000
alice:500000:0
"""


def test_ranges_are_found_by_name_and_by_uid_in_file_order() -> None:
    assert subids.parse_ranges(SUBUID, "alice", 1000) == [subids.Range(165536, 65536), subids.Range(300000, 1000)]
    assert subids.parse_ranges(SUBUID, "bob", 1234) == [subids.Range(400000, 70000)]
    assert subids.parse_ranges(SUBUID, None, 1234) == [subids.Range(400000, 70000)]
    assert subids.parse_ranges(SUBUID, "carol", 99) == []


@pytest.fixture
def user() -> tuple[str, int]:
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name, uid
    except KeyError:
        pytest.skip("this uid has no user name")


@pytest.fixture
def helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subids, "_privileged", lambda path: True)
    monkeypatch.setattr(subids, "_no_new_privs", lambda: False)


def _files(tmp_path: Path, subuid: str, subgid: str | None = None) -> dict[str, Path]:
    (tmp_path / "subuid").write_text(subuid)
    (tmp_path / "subgid").write_text(subuid if subgid is None else subgid)
    return {"subuid_file": tmp_path / "subuid", "subgid_file": tmp_path / "subgid"}


def _which(name: str) -> str:
    return f"/usr/bin/{name}"


def test_a_full_mapping_maps_root_to_the_caller_and_the_rest_to_the_first_big_range(
    tmp_path: Path, user: tuple[str, int], helpers: None
) -> None:
    name, uid = user
    files = _files(tmp_path, f"{name}:100:10\n{name}:200000:65536\n", f"{uid}:300000:100000\n")
    mapping = subids.find_mapping(uid=uid, gid=50, which=_which, **files)
    assert mapping.commands(42) == [
        ["/usr/bin/newuidmap", "42", "0", str(uid), "1", "1", "200000", "65536"],
        ["/usr/bin/newgidmap", "42", "0", "50", "1", "1", "300000", "65536"],
    ]


def test_no_entry_names_the_user_the_file_and_the_usermod_command(tmp_path: Path, user: tuple[str, int], helpers: None) -> None:
    name, uid = user
    files = _files(tmp_path, "someoneelse:100000:65536\n", f"{name}:100000:65536\n")
    with pytest.raises(subids.SubordinateIdError) as caught:
        subids.find_mapping(uid=uid, which=_which, **files)
    assert caught.value.problems == [subids.NO_ENTRY.format(file=files["subuid_file"], kind="uid", user=name, uid=uid)]
    # a range that no other user has: after someoneelse's
    assert caught.value.hint == f"as root: usermod --add-subuids 165536-231071 --add-subgids 165536-231071 {name}"
    assert str(caught.value).endswith(f". Hint: {caught.value.hint}")


def test_a_missing_file_and_a_too_small_range_are_both_reported(tmp_path: Path, user: tuple[str, int], helpers: None) -> None:
    name, uid = user
    with pytest.raises(subids.SubordinateIdError) as caught:
        subids.find_mapping(
            uid=uid,
            which=_which,
            subuid_file=tmp_path / "absent",
            subgid_file=_files(tmp_path, f"{name}:100000:1000\n")["subgid_file"],
        )
    assert caught.value.problems == [
        subids.NO_FILE.format(file=tmp_path / "absent", user=name, kind="uid"),
        subids.TOO_SMALL.format(
            file=tmp_path / "subgid", user=name, count=1000, kind="gid", ranges="100000-100999", needed=65536
        ),
    ]
    assert caught.value.hint == f"as root: usermod --add-subuids 101000-166535 --add-subgids 101000-166535 {name}"


def test_missing_helpers_name_the_package(tmp_path: Path, user: tuple[str, int], helpers: None) -> None:
    name, uid = user
    files = _files(tmp_path, f"{name}:100000:65536\n")
    with pytest.raises(subids.SubordinateIdError) as caught:
        subids.find_mapping(uid=uid, which=lambda tool: None, **files)
    assert caught.value.problems == [subids.NO_HELPERS.format(names="newuidmap and newgidmap")]
    assert "apt install uidmap" in str(caught.value)
    assert caught.value.hint == ""  # the ranges are there: no usermod advice


def test_an_unprivileged_helper_and_no_new_privs_are_diagnosed(
    tmp_path: Path, user: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, uid = user
    files = _files(tmp_path, f"{name}:100000:65536\n")
    monkeypatch.setattr(subids, "_privileged", lambda path: path.endswith("newgidmap"))
    monkeypatch.setattr(subids, "_no_new_privs", lambda: True)
    with pytest.raises(subids.SubordinateIdError) as caught:
        subids.find_mapping(uid=uid, which=_which, **files)
    assert caught.value.problems == [subids.HELPER_NOT_PRIVILEGED.format(path="/usr/bin/newuidmap"), subids.NO_NEW_PRIVS]


def test_a_sandbox_maps_subordinate_ids_from_outside_only_when_asked() -> None:
    plan = MountPlan("/scratch", "/scratch/root", ())
    config = SandboxConfig(plan, "none", 1000, 1000, {}, "/", 40)
    assert [name for name, _ in unshare_steps(config)] == ["unshare_namespaces", "write_id_maps"]
    mapping = subids.IdMapping(1000, 1000, subids.Range(1, 65536), subids.Range(1, 65536), "newuidmap", "newgidmap")
    mapped = SandboxConfig(plan, "none", 1000, 1000, {}, "/", 40, id_mapping=mapping)
    mapper = subids.ParentMapper(mapping)
    try:
        assert [name for name, _ in unshare_steps(mapped, mapper)] == ["unshare_namespaces", "map_subordinate_ids"]
    finally:
        mapper.close()
    with pytest.raises(ValueError):
        unshare_steps(mapped)  # a full map is never written by the process itself


def test_the_suggested_range_starts_after_every_range_given_out(tmp_path: Path) -> None:
    files = _files(tmp_path, "a:100000:65536\nb:300000:65536\n# c:900000:65536\nbroken\n", "a:200000:65536\n")
    assert subids.free_start(*files.values()) == 365536
    assert subids.free_start(tmp_path / "absent") == 100000


def test_root_maps_the_same_ids_itself() -> None:
    mapping = subids.root_mapping()
    assert mapping.direct
    assert (mapping.uid, mapping.gid, mapping.subuid.start, mapping.subuid.count) == (0, 0, 1, subids.MAPPED_IDS)


def test_roots_sandboxes_map_a_high_range_no_user_group_or_subordinate_range_owns(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    group = tmp_path / "group"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n")
    group.write_text("root:x:0:\nalice:x:1000:\n")
    files = _files(tmp_path, "alice:100000:65536\n", "alice:100000:65536\n")
    mapping = subids.root_sandbox_mapping(passwd_file=passwd, group_file=group, **files)
    assert mapping.direct  # written by root itself, no newuidmap
    assert (mapping.uid, mapping.gid) == (os.getuid(), os.getgid())
    assert mapping.subuid == mapping.subgid == subids.Range(subids.SANDBOX_FIRST_ID, subids.MAPPED_IDS)
    assert subids.SANDBOX_FIRST_ID + 999 == 2_130_001_000  # a sandbox's uid 1000 on the host


@pytest.mark.parametrize(
    ("passwd", "group", "subuid", "taken"),
    [
        ("svc:x:2130001000:1::/:/bin/false\n", "", "", "passwd: svc (2130001000)"),
        ("", "grp:x:2130065536:\n", "", "group: grp (2130065536)"),
        ("", "", "bob:2129999000:2000\n", "subuid: bob:2129999000:2000"),
    ],
)
def test_a_taken_high_range_is_refused_naming_what_takes_it(
    tmp_path: Path, passwd: str, group: str, subuid: str, taken: str
) -> None:
    (tmp_path / "passwd").write_text(passwd)
    (tmp_path / "group").write_text(group)
    files = _files(tmp_path, subuid, "")
    with pytest.raises(subids.SubordinateIdError) as caught:
        subids.root_sandbox_mapping(passwd_file=tmp_path / "passwd", group_file=tmp_path / "group", **files)
    assert "ids 2130000001-2130065536 (for a sandbox's ids 1-65536) are not free" in str(caught.value)
    assert taken in str(caught.value)


def test_the_builder_gets_the_mapping_as_arguments() -> None:
    ranges = subids.Range(100000, 65536), subids.Range(200000, 65536)
    mapping = subids.IdMapping(1001, 1001, *ranges, "/x/newuidmap", "/x/newgidmap")
    assert subids.IdMapping.from_args(mapping.to_args()) == mapping
    assert subids.IdMapping.from_args(subids.root_mapping().to_args()) == subids.root_mapping()


def test_a_range_is_usable_only_where_one_line_of_the_own_map_covers_it() -> None:
    assert subids.covers("         0          0 4294967295\n", subids.SANDBOX_FIRST_ID, subids.SANDBOX_FIRST_ID + 65535)
    container = "0 100000 65536\n"  # root of a container with 65536 ids
    assert not subids.covers(container, subids.SANDBOX_FIRST_ID, subids.SANDBOX_FIRST_ID + 65535)
    assert subids.covers(container, 1, 65535)
    assert not subids.covers("0 0 1\n1 100000 65536\n", 0, 10)  # two lines: the kernel needs one


def test_doctor_warns_when_sandboxes_map_one_id(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_nsbox import probe

    monkeypatch.setattr(subids, "_sandbox_ids", (os.getpid(), subids.SandboxIds(None, "no range for you")))
    result = probe.sandbox_id_range()
    assert not result.ok and result.reason == "sandboxes map one id: no range for you"
    assert "/etc/subuid" in result.fix
