"""Limit outcomes from canned counters; cgroup backends against a fake cgroupfs tree (parsing only)."""

from __future__ import annotations

from pathlib import Path

from pytest_nsbox.box import cgroups
from pytest_nsbox.box.config import SandboxResult
from pytest_nsbox.reports import limit_violation, trim_stack
from pytest_nsbox.spec import SandboxSpec

DUMP = """\
Thread 0x00007f1 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 320 in wait
  File "/x/pytest_nsbox/runtest.py", line 9 in run_protocol_in_child
  File "/x/_pytest/main.py", line 1 in main

Current thread 0x00007f2 (most recent call first):
  File "/t/test_a.py", line 29 in test_sleep
  File "/x/_pytest/python.py", line 187 in pytest_pyfunc_call
  File "/x/pytest_nsbox/compat.py", line 502 in run_protocol_in_child
  File "/x/pytest_nsbox/box/steps.py", line 245 in run_test
"""


def test_trim_stack_keeps_the_tests_frames_of_every_thread() -> None:
    assert trim_stack(DUMP).splitlines() == [
        "Thread 0x00007f1 (most recent call first):",
        '  File "/usr/lib/python3.11/threading.py", line 320 in wait',
        "Current thread 0x00007f2 (most recent call first):",
        '  File "/t/test_a.py", line 29 in test_sleep',
        '  File "/x/_pytest/python.py", line 187 in pytest_pyfunc_call',
    ]


def test_violations_in_order_timeout_memory_pids() -> None:
    spec = SandboxSpec(memory=64 * 2**20, pids=32, timeout=10)
    timed_out = SandboxResult(timed_out=True, stack="")
    usage = cgroups.Usage(memory_peak=64 * 2**20, oom_kills=1, pids_limit_hits=3)
    cause = limit_violation(spec, timed_out)
    assert cause is not None and cause.message.startswith("nsbox: test timed out after 10.0s")
    cause = limit_violation(spec, SandboxResult(usage=usage))
    assert cause is not None
    assert cause.message == "nsbox: test exceeded its memory limit of 64 MiB (peak 64 MiB, 1 process OOM-killed)"
    cause = limit_violation(spec, SandboxResult(usage=cgroups.Usage(pids_limit_hits=3)))
    assert cause is not None and cause.message == "nsbox: pids limit 32 reached (3 fork(s) refused)"
    assert limit_violation(spec, SandboxResult(usage=cgroups.Usage(memory_peak=1))) is None


def _fake_v2(tmp_path: Path, files: dict[str, str]) -> cgroups.CgroupV2:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return cgroups.CgroupV2("nsbox-1-1", {"": tmp_path})


def test_v2_usage_parsing(tmp_path: Path) -> None:
    cgroup = _fake_v2(
        tmp_path,
        {
            "memory.peak": "1048576\n",
            "memory.events": "low 0\nhigh 0\nmax 12\noom 1\noom_kill 2\noom_group_kill 1\n",
            "pids.events": "max 5\n",
        },
    )
    assert cgroup.usage() == cgroups.Usage(memory_peak=2**20, oom_kills=2, pids_limit_hits=5)


def test_v2_apply_writes_the_kernels_files(tmp_path: Path) -> None:
    cgroup = _fake_v2(tmp_path, {"memory.swap.max": "max"})
    cgroup.apply(cgroups.Limits(memory=2**26, pids=64, cpus=0.5))
    assert (tmp_path / "memory.max").read_text() == str(2**26)
    assert (tmp_path / "memory.swap.max").read_text() == "0"
    assert (tmp_path / "memory.oom.group").read_text() == "1"
    assert (tmp_path / "pids.max").read_text() == "64"
    assert (tmp_path / "cpu.max").read_text() == "50000 100000"


def test_v2_apply_leaves_oom_group_off_when_an_oom_kill_is_expected(tmp_path: Path) -> None:
    """memory.oom.group would kill the test process with the expected victim."""
    cgroup = _fake_v2(tmp_path, {})
    cgroup.apply(cgroups.Limits(memory=2**26, oom_group=False))
    assert (tmp_path / "memory.max").read_text() == str(2**26)
    assert not (tmp_path / "memory.oom.group").exists()


def test_v1_usage_parsing(tmp_path: Path) -> None:
    memory, pids = tmp_path / "memory", tmp_path / "pids"
    memory.mkdir()
    pids.mkdir()
    (memory / "memory.max_usage_in_bytes").write_text("4096\n")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    (pids / "pids.events").write_text("max 0\n")
    cgroup = cgroups.CgroupV1("nsbox-1-1", {"memory": memory, "pids": pids})
    assert cgroup.usage() == cgroups.Usage(memory_peak=4096, oom_kills=1, pids_limit_hits=0)
    assert cgroup.join_files == (str(memory / "tasks").encode(), str(pids / "tasks").encode())


def test_limits_controllers() -> None:
    assert cgroups.Limits().controllers() == []
    assert cgroups.Limits(pids=1024, account_memory=True).controllers() == ["memory", "pids"]
    assert cgroups.Limits(cpus=0.5).controllers() == ["cpu"]


def test_sweep_removes_only_dead_owners(tmp_path: Path) -> None:
    import os

    manager = cgroups.ManagerV2(tmp_path)
    dead = tmp_path / "nsbox-999999999-1"
    alive = tmp_path / f"nsbox-{os.getpid()}-1"
    foreign = tmp_path / "someone-else"
    for path in (dead, alive, foreign):
        path.mkdir()
    assert manager.sweep() == [str(dead)]
    assert alive.exists() and foreign.exists()


def test_trim_stack_keeps_a_test_blocked_in_package_code() -> None:
    dump = (
        "Current thread 0x1 (most recent call first):\n"
        '  File "/x/pytest_nsbox/box/wire.py", line 60 in send\n'
        '  File "/t/test_a.py", line 3 in test_report_hook\n'
        '  File "/x/pytest_nsbox/compat.py", line 70 in run_protocol\n'
    )
    assert trim_stack(dump).splitlines()[1:] == [
        '  File "/x/pytest_nsbox/box/wire.py", line 60 in send',
        '  File "/t/test_a.py", line 3 in test_report_hook',
    ]


def test_usage_reads_counters_opened_ahead(tmp_path: Path) -> None:
    cgroup = _fake_v2(tmp_path, {"memory.peak": "4096\n", "memory.events": "oom_kill 0\n", "pids.events": "max 0\n"})
    cgroup.open_counters()
    (tmp_path / "memory.peak").write_text("8192\n")  # same file, rewritten in place: the kept fd sees it
    (tmp_path / "memory.events").write_text("oom_kill 3\n")
    assert cgroup.usage() == cgroups.Usage(memory_peak=8192, oom_kills=3, pids_limit_hits=0)
    cgroup._close_counters()
    assert cgroup._counter_fds == {}


def test_a_full_disk_bound_is_the_cause() -> None:
    spec = SandboxSpec(disk=8 * 2**20)
    full = SandboxResult(records=[{"kind": "disk_usage", "free": 4096, "free_inodes": 100}])
    cause = limit_violation(spec, full)
    assert cause is not None and cause.name == "disk" and "disk limit of 8 MiB reached" in cause.message
    no_inodes = SandboxResult(records=[{"kind": "disk_usage", "free": 2**20, "free_inodes": 0}])
    assert "no inode left" in limit_violation(spec, no_inodes).message  # type: ignore[union-attr]
    room = SandboxResult(records=[{"kind": "disk_usage", "free": 2**20, "free_inodes": 100}])
    assert limit_violation(spec, room) is None
    forged = SandboxResult(records=[{"kind": "disk_usage", "free": "lots"}])
    assert limit_violation(spec, forged) is None  # the record comes from the test's process: checked
