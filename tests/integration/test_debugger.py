"""pdb in a sandboxed test (--pdb, --trace, breakpoint()) is pdb on the user's terminal, as without
sandboxing; pytest's faulthandler_timeout dumps the test's stack and never hangs it.

The interactive tests drive an inner pytest on a pseudo-terminal (its controlling terminal: ^C is
SIGINT for its foreground process group, P and the test alike).
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]

TESTS_DIR = Path(__file__).resolve().parents[1]  # the inner pytest imports helpers from here
INTERRUPT_TRIES = 10  # ^C at pdb's prompt (see Terminal.interrupt_prompt)
INTERRUPT_WAIT = 3.0  # seconds for pdb's answer to one ^C before the next
HANG_GUARD = 120.0  # seconds without the expected output before the test gives up (never reached when it works)

FAILING = """
import pytest

@pytest.mark.nsbox
def test_fails():
    x = 42
    assert x == 0
"""


class Terminal:
    """An inner pytest on a pseudo-terminal: wait for its output, type at it."""

    def __init__(self, cwd: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(TESTS_DIR), "TERM": "dumb", "NO_COLOR": "1"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a new session with the pty as its controlling terminal
            try:
                os.chdir(cwd)
                os.execve(sys.executable, [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], env)
            finally:
                os._exit(127)
        self.output = b""
        self._seen = 0
        self.reaped = False

    def expect(self, text: str, within: float = HANG_GUARD) -> str:
        """Read until *text* appears after what the last expect matched; the output up to it."""
        deadline = time.monotonic() + within
        while (index := self.output.find(text.encode(), self._seen)) < 0:
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(f"never saw {text!r}; output:\n{self.output.decode(errors='replace')}")
        start, self._seen = self._seen, index + len(text)
        return self.output[start : self._seen].decode(errors="replace")

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def interrupt_prompt(self) -> None:
        """^C at pdb's prompt, until pdb says ``--KeyboardInterrupt--``: a ^C that arrives while
        readline sets up the terminal is lost, unsandboxed too (seen under load), and a user presses
        again."""
        for _ in range(INTERRUPT_TRIES - 1):
            self.send("\x03")
            try:
                self.expect("--KeyboardInterrupt--", within=INTERRUPT_WAIT)
                return
            except AssertionError:
                continue
        self.send("\x03")
        self.expect("--KeyboardInterrupt--")

    def finish(self) -> tuple[int, str]:
        """Read to the end; the exit code and the whole output."""
        deadline = time.monotonic() + HANG_GUARD
        while self._read(deadline - time.monotonic()):
            pass
        _, status = os.waitpid(self.pid, 0)
        self.reaped = True
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status), self.output.decode(errors="replace")

    def _read(self, timeout: float) -> bool:
        if timeout <= 0 or not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: every process holding the pty's other end is gone
            return False
        self.output += chunk
        return bool(chunk)

    def kill(self) -> None:
        if not self.reaped:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
            os.close(self.fd)


@pytest.fixture
def terminal(pytester: pytest.Pytester):
    started: list[Terminal] = []

    def start(source: str, *args: str) -> Terminal:
        pytester.makepyfile(test_inner=textwrap.dedent(source))
        started.append(Terminal(pytester.path, *args))
        return started[-1]

    yield start
    for term in started:
        term.kill()  # a test that failed half-way leaves no inner pytest behind


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def failures_once(output: str) -> None:
    """The test is reported once: one FAILED line, no ERROR, no internal error."""
    assert output.count("FAILED test_inner.py::") == 1, output
    assert "ERROR test_inner.py" not in output and "internal error" not in output, output


@pytest.mark.parametrize("capture", [(), ("-s",)], ids=["captured", "no-capture"])
def test_pdb_post_mortem_on_the_terminal(terminal, capture: tuple[str, ...]) -> None:
    term = terminal(FAILING, "--pdb", "-rA", *capture)
    term.expect("(Pdb) ")
    term.send("p x * 2\n")
    term.expect("84")
    term.send("c\n")
    code, output = term.finish()
    assert code == 1, output
    failures_once(output)
    assert "= FAILURES =" not in output, output  # --pdb showed the failure already, as without sandboxing


@pytest.mark.parametrize("build_mode", ["prebuilt", "forked"])
def test_pdb_with_stdin_not_a_terminal_reads_it(pytester: pytest.Pytester, build_mode: str) -> None:
    """The issue's case: stdin and stdout are pipes (pytest's capture saved them; the sandbox closed them)."""
    pytester.makepyfile(test_inner=FAILING)
    args = () if build_mode == "prebuilt" else ("-o", "nsbox_prebuild=false")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "--pdb", *args],
        cwd=pytester.path,
        input="p x * 2\nc\n",
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(TESTS_DIR)},
        timeout=HANG_GUARD,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "(Pdb) 84" in output, output
    failures_once(output)


def test_ctrl_c_at_the_prompt_is_pdbs_and_q_quits(terminal) -> None:
    term = terminal(FAILING, "--pdb")
    term.expect("(Pdb) ")
    term.interrupt_prompt()  # pdb: --KeyboardInterrupt--, a new prompt; P must not kill the sandbox
    term.expect("(Pdb) ")
    term.send("p x\n")
    term.expect("42")
    term.send("q\n")
    code, output = term.finish()
    assert "Quitting debugger" in output, output
    assert code == 2, output  # pytest.exit's code, as without sandboxing
    failures_once(output)


def test_trace_and_the_sandbox_timeout_clock_stops_at_the_prompt(terminal) -> None:
    """The user sits at the prompt (pdb sleeps for them) longer than the sandbox's timeout: the
    clock stops meanwhile, so the test passes; its own steps take far less than the timeout."""
    term = terminal(
        """
        import pytest

        @pytest.mark.nsbox(timeout=4)
        def test_traced():
            value = 5
            value += 1
            assert value == 6
        """,
        "--trace",
    )
    term.expect("(Pdb) ")
    term.send("n\n")
    term.expect("(Pdb) ")
    term.send("n\n")
    term.expect("(Pdb) ")
    term.send("p value\n")
    term.expect("6")
    term.send("import time; time.sleep(6)\n")
    term.expect("(Pdb) ")
    term.send("c\n")
    code, output = term.finish()
    assert code == 0 and "1 passed" in output, output


def test_breakpoint_then_ctrl_c_breaks_into_pdb_again(terminal, tmp_path: Path) -> None:
    term = terminal(
        """
        import time, pytest

        @pytest.mark.nsbox
        def test_loops(tmp_path):
            breakpoint()
            rounds = 0
            while True:  # only the user ends this: ^C, then q
                rounds += 1
                if rounds == 1:
                    (tmp_path / "looping").touch()
                time.sleep(0.01)
        """,
        f"--basetemp={tmp_path / 'inner'}",
    )
    term.expect("(Pdb) ")
    term.send("c\n")
    wait_for(tmp_path / "inner" / "test_loops0" / "looping")  # pdb has continued (and resumed capture)
    term.send("\x03")
    term.expect("(Pdb) ")
    term.send("p rounds > 0\n")
    term.expect("True")
    term.send("q\n")
    code, output = term.finish()
    assert "Quitting debugger" in output and code == 2, output


def test_faulthandler_timeout_dumps_the_tests_stack_and_never_hangs(run_inner) -> None:
    """pytest's faulthandler_timeout: the watchdog runs in the test process; the failing test
    (pytest cancels the watchdog when its exception interacts) used to hang forever."""
    result = run_inner(
        """
        import time, pytest

        @pytest.mark.nsbox
        def test_fails():
            assert 1 == 2

        @pytest.mark.nsbox
        def test_outlives_the_watchdog():
            time.sleep(5)
        """,
        "-o",
        "faulthandler_timeout=1",
        timeout=HANG_GUARD,
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stderr.fnmatch_lines(["*Timeout (0:00:01)!*", '*File "*test_inner.py", line * in test_outlives_the_watchdog*'])
