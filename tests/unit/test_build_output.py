"""A build step's output is shown while the step runs: every line, or now and then the last one."""

from __future__ import annotations

import threading
from pathlib import Path

from pytest_nsbox.images.recipes import OutputFollower


class QuickFollower(OutputFollower):
    POLL = 0.01
    QUIET_AFTER = 0.05


class Shown:
    """What the follower emitted; waits until a line with a given text is there."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()

    def emit(self, line: str) -> None:
        with self._changed:
            self.lines.append(line)
            self._changed.notify_all()

    def wait_for(self, text: str) -> list[str]:
        with self._changed:
            assert self._changed.wait_for(lambda: any(text in line for line in self.lines), timeout=10), self.lines
            return list(self.lines)


def test_every_line_as_it_comes(tmp_path: Path) -> None:
    log = tmp_path / "output.log"
    log.write_bytes(b"")
    shown = Shown()
    follower = QuickFollower(log, "step 2/3", shown.emit, lines=True)
    follower.start()
    try:
        with open(log, "ab", buffering=0) as handle:
            handle.write(b"Get:1 bookworm\n")
            assert "step 2/3 | Get:1 bookworm" in shown.wait_for("Get:1")  # while the writer still runs
            handle.write(b"progress 10%\rprogress 90%\n")
            assert "step 2/3 | progress 90%" in shown.wait_for("progress")  # a terminal's last state of the line
    finally:
        follower.stop()
    assert not any("10%" in line for line in shown.lines)


def test_the_last_line_and_the_time_when_quiet(tmp_path: Path) -> None:
    log = tmp_path / "output.log"
    log.write_bytes(b"Unpacking curl\n")
    shown = Shown()
    follower = QuickFollower(log, "step 2/3", shown.emit, lines=False)
    follower.start()
    try:
        lines = shown.wait_for("Unpacking curl")
    finally:
        follower.stop()
    assert all(not line.startswith("step 2/3 |") for line in lines)  # not every line
    beat = next(line for line in lines if "Unpacking curl" in line)
    assert beat.startswith("step 2/3: running for ") and beat.endswith("s: Unpacking curl")
