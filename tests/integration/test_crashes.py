"""Crashes leave nothing behind: ``kill -9`` of pytest or of its sandbox builder at random moments,
then one normal run: no cgroup, scratch dir, mount or process of a killed run is left (issue 12 item 4).

NSBOX_TEST_KILL_RUNS sets how many runs are killed (200 by default, as CI runs it), NSBOX_TEST_KILL_SEED
replays a campaign (the seed is printed)."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import BUILDER_TOKEN, processes

from pytest_nsbox import probe
from pytest_nsbox.box import cgroups, faults, mounts

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns, pytest.mark.needs_cgroup_limits]

RUNS = int(os.environ.get("NSBOX_TEST_KILL_RUNS", "200"))
RUN_TIMEOUT = 120.0  # seconds a run whose builder was killed gets to finish (it goes on without it)
EXIT_WAIT = 30.0  # seconds the processes of a killed run get to be gone (SIGKILL by PR_SET_PDEATHSIG)

INNER_TEST = """
import subprocess, sys, time, pytest

@pytest.mark.nsbox(memory="64M")                 # a cgroup per sandbox
@pytest.mark.parametrize("n", range(4))
def test_limited(n):
    if n == 1:                                   # a daemon in a session of its own
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", {token!r}], start_new_session=True)
    time.sleep(0.02)

@pytest.mark.nsbox(timeout=0.5)                  # P ends it; once P is killed, only the parent-death chain can
def test_hangs():
    time.sleep(300)

@pytest.mark.nsbox
@pytest.mark.parametrize("n", range(2))
def test_plain(n):
    pass

@pytest.mark.nsbox(memory="64M", network="none", timeout=60)
def test_last():
    time.sleep(0.02)
"""


@dataclass
class Campaign:
    """The runs one test started: their pids, and a token in every command line they start."""

    token: str  # a directory: in each run's --basetemp, hence in the command line of P and its forks
    tmpdir: str  # the runs' TMPDIR, where their scratch dirs are: no other pytest sweeps them
    pids: list[int] = field(default_factory=list)

    def command(self, n: int, *options: str) -> list[str]:
        return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--basetemp={self.token}/run-{n}", *options]

    def _ours(self, pid: int, argv: tuple[bytes, ...]) -> bool:
        """A process of one of our runs: a fork of P (P's argv), a builder (its argv ends with P's
        pid; the sandboxes B' are forks of it), a test's daemon (the token), or a process in one of
        our runs' cgroups."""
        line = b"\0".join(argv)
        if self.token.encode() in line:
            return True
        if BUILDER_TOKEN in line and argv[-1].isdigit() and int(argv[-1]) in self.pids:
            return True
        try:
            cgroups = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return False
        return any(re.search(rf"/nsbox-{p}-\d+$", cgroups, re.M) for p in self.pids)

    def processes(self) -> list[int]:
        return [p.pid for p in processes() if p.pid != os.getpid() and self._ours(p.pid, p.argv)]

    def dead(self) -> list[int]:
        return [p for p in self.pids if not os.path.exists(f"/proc/{p}")]

    def leftovers(self) -> list[str]:
        """Everything of our killed runs still on the host."""
        dead = self.dead()
        left = [f"process {pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()!r}" for pid in self.processes()]
        for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup"):
            left += [f"cgroup {dirpath}/{d}" for d in dirnames if any(d.startswith(f"nsbox-{p}-") for p in dead)]
        left += [f"scratch dir {self.tmpdir}/{n}" for n in os.listdir(self.tmpdir) if _scratch_pid(n) in self.pids]
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            if self.token in line or any(f"pytest-nsbox-{p}-" in line for p in dead):
                left.append(f"mount {line}")
        return left

    def clean_up(self) -> None:
        """Kill what our runs left (only theirs, by pid) and remove their cgroups: a failed
        campaign must not leave its mess to the next test."""
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_until(lambda: not self.processes(), EXIT_WAIT)
        for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup", topdown=False):
            for d in dirnames:
                if any(d.startswith(f"nsbox-{p}-") for p in self.pids):
                    try:
                        os.rmdir(f"{dirpath}/{d}")
                    except OSError:
                        pass
        # The runs' TMPDIR: scratch dirs, the memory budget's ledger, and the files tempfile leaves when
        # a process is killed while it probes the directory. Never below a mount (a leak, kept to look at).
        if self.tmpdir not in Path("/proc/self/mountinfo").read_text():
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def _scratch_pid(name: str) -> int | None:
    """The pid in a scratch dir's name (mounts.SCRATCH_PREFIX + "<pid>-...")."""
    match = re.match(rf"{mounts.SCRATCH_PREFIX}(\d+)-", name)
    return int(match.group(1)) if match else None


@pytest.fixture
def own_cgroup_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """On cgroup v1, a cgroup root of the campaign's own (as test_limits' private_cgroup_root):
    another pytest on the machine sweeps the usual root, and would hide what the campaign's own
    runs fail to sweep. v2 runs in UML, alone."""
    base = os.environ.get(probe.CGROUP_ROOT_ENV, "")
    manager = cgroups.detect(base)
    if not isinstance(manager, cgroups.ManagerV1):
        yield
        return
    private = f"{manager.root_name}/kill-campaign-{uuid.uuid4().hex[:12]}"
    made = [cgroups.CGROUP_MOUNT / ctrl / private for ctrl in cgroups.V1_CONTROLLERS]
    for path in made:
        path.mkdir(parents=True)
    monkeypatch.setenv(probe.CGROUP_ROOT_ENV, private)
    try:
        yield
    finally:
        for path in made:
            for child in path.iterdir():
                if child.is_dir():
                    child.rmdir()
            path.rmdir()


def _wait_until(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_builder_of(pid: int) -> bool:
    """SIGKILL the sandbox builder that run *pid* started (its child), through a pidfd opened while it
    is still that child: never another process that got its pid. False if it has none (yet, or any more)."""
    for process in processes():
        if process.ppid == pid and BUILDER_TOKEN in b"\0".join(process.argv):
            try:
                pidfd = os.pidfd_open(process.pid)
            except ProcessLookupError:
                return False
            try:
                stat = Path(f"/proc/{process.pid}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
                    return False  # gone, its pid taken by another process
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                return True
            except (OSError, ValueError):
                return False
            finally:
                os.close(pidfd)
    return False


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_nothing_behind(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, own_cgroup_root: None
) -> None:
    seed = int(os.environ.get("NSBOX_TEST_KILL_SEED", random.randrange(2**32)))
    print(f"kill -9 campaign: {RUNS} runs, seed {seed} (replay with NSBOX_TEST_KILL_SEED={seed})")
    rng = random.Random(seed)
    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    campaign = Campaign(token=str(pytester.mkdir("campaign")), tmpdir=tempfile.mkdtemp(prefix="nsbox-kill-campaign-"))
    monkeypatch.setenv("TMPDIR", campaign.tmpdir)
    pytester.makepyfile(test_inner=INNER_TEST.format(token=campaign.token))
    modes = {"prebuilt": (), "forked": ("-o", "nsbox_prebuild=false")}

    def start(n: int, mode: str) -> subprocess.Popen[bytes]:
        # output to a file, not a pipe: a process a killed run left would hold a pipe open
        with open(f"{campaign.token}/run-{n}.log", "wb") as log:
            run = subprocess.Popen(campaign.command(n, *modes[mode]), cwd=pytester.path, stdout=log, stderr=subprocess.STDOUT)
        campaign.pids.append(run.pid)
        return run

    def finish(n: int, run: subprocess.Popen[bytes]) -> str:
        try:
            run.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
            pytest.fail(f"run {n} (seed {seed}) did not end in {RUN_TIMEOUT} s")
        return Path(f"{campaign.token}/run-{n}.log").read_text()

    try:
        began = time.monotonic()
        output = finish(0, start(0, "prebuilt"))
        duration = time.monotonic() - began
        assert "1 failed, 7 passed" in output, output
        killed = {"pytest": 0, "builder": 0}
        for n in range(1, RUNS + 1):
            victim = rng.choice(["pytest", "builder"])
            mode = "prebuilt" if victim == "builder" else rng.choice(list(modes))
            delay = rng.uniform(0, duration)
            run = start(n, mode)
            time.sleep(delay)
            if victim == "builder" and not _kill_builder_of(run.pid):
                victim = "pytest"  # no builder yet (or any more): kill pytest instead
            if victim == "pytest":
                run.send_signal(signal.SIGKILL)  # our child, not reaped yet: never another process
            killed[victim] += 1
            output = finish(n, run)
            # Its builder killed, pytest goes on. A test running in a sandbox the builder built dies with it
            # (FAILED); one about to join such a sandbox finds it gone (SKIPPED: step join_namespaces failed,
            # and with test_hangs skipped the run can pass).
            if victim == "builder" and run.returncode not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
                pytest.fail(f"run {n} (seed {seed}): pytest exited {run.returncode} after its builder was killed:\n{output}")
        print(f"killed: {killed}")
        # Every process of a killed run dies with its parent (PR_SET_PDEATHSIG) or its PID namespace.
        assert _wait_until(lambda: not campaign.processes(), EXIT_WAIT), campaign.leftovers()
        output = finish(RUNS + 1, start(RUNS + 1, "prebuilt"))
        assert "1 failed, 7 passed" in output, output
        assert campaign.leftovers() == []
    finally:
        campaign.clean_up()
