"""A crash is a test outcome, not the end of the test run.

Each sandboxed test runs in its own forked process. If it dies, pytest-nsbox reports how it
died (the signal name, e.g. SIGSEGV) as the test's failure, and pytest goes on with the next test.

Both tests below are EXPECTED to fail, so they are marked xfail(strict=True): they show as
XFAIL, and would turn into a failure of the run if they ever passed. raises=pytest.fail.Exception
lets only the failure that pytest-nsbox reports count as expected (not, say, the RuntimeError of
require_sandbox() when the plugin is off). conftest.py prints the message each one failed with.
"""

from __future__ import annotations

import faulthandler
import os
import signal

import pytest

import pytest_nsbox


@pytest.mark.xfail(
    reason="segfaults on purpose: reported as 'crashed with signal SIGSEGV'", raises=pytest.fail.Exception, strict=True
)
@pytest.mark.nsbox
def test_segfault() -> None:
    pytest_nsbox.require_sandbox()  # never crash the pytest process itself (e.g. under -p no:nsbox)
    faulthandler.disable()  # else pytest's faulthandler prints the crashing thread's stack on the terminal
    os.kill(os.getpid(), signal.SIGSEGV)  # what a crashing C extension does


@pytest.mark.xfail(reason="exits without reporting: FAILED, never PASSED", raises=pytest.fail.Exception, strict=True)
@pytest.mark.nsbox
def test_exit_without_reporting() -> None:
    pytest_nsbox.require_sandbox()  # outside a sandbox this would end pytest with status 0
    os._exit(0)  # status 0, but no result: pytest-nsbox does not take this for a pass


def test_pytest_went_on() -> None:
    """Runs on the host after the two crashes: the pytest process is fine."""
    assert True
