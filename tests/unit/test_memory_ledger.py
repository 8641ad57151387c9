"""The memory ledger's bookkeeping: entries of gone processes are reclaimed, a shared directory is refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pytest_nsbox.budget import BudgetError, MemoryLedger

MIB = 2**20


def test_admit_counts_the_living_and_reclaims_the_dead(tmp_path: Path) -> None:
    ledger = MemoryLedger(tmp_path / "ledger", 300 * MIB, "test")
    held = ledger.admit(200 * MIB)
    assert held.waited == 0.0 and ledger.in_use() == 200 * MIB
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "ledger" / f"{gone.pid}.123.0.limit").write_text(str(200 * MIB))  # a run killed with SIGKILL
    (tmp_path / "ledger" / f"{os.getpid()}.1.0.limit").write_text(str(200 * MIB))  # a reused pid: other start time
    assert ledger.in_use() == 200 * MIB
    assert sorted(p.name for p in (tmp_path / "ledger").glob("*.limit")) == [held.entry.name]
    ledger.release(held)
    assert ledger.in_use() == 0


def test_a_limit_over_the_budget_and_a_shared_ledger_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BudgetError, match="memory limit of 400 MiB is bigger than the whole memory budget of 300 MiB"):
        MemoryLedger(tmp_path / "ledger", 300 * MIB, "test").admit(400 * MIB)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    with pytest.raises(BudgetError, match="is not a directory of yours alone"):
        MemoryLedger(shared, 300 * MIB, "test").admit(100 * MIB)


def test_a_symlink_planted_for_the_ledger_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    os.symlink(tmp_path / "elsewhere", tmp_path / "ledger")
    with pytest.raises(BudgetError, match="is not a directory of yours alone"):
        MemoryLedger(tmp_path / "ledger", 300 * MIB, "test").check(100 * MIB)
    assert not list((tmp_path / "elsewhere").iterdir())
