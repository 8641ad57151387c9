"""Run a function in a throwaway forked child and get back what went wrong (mechanism only)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

MAX_MESSAGE: Final = 4000  # bytes of the child's error that reach the parent


def describe_exception(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_in_child(body: Callable[[], None], describe: Callable[[BaseException], str] = describe_exception) -> str:
    """Run *body* in a forked child (for what must not touch this process: unshare, a probe,
    extracting as another user); "" if it returned, else its exception as *describe* puts it,
    or its exit status."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            body()
            code = 0
        except BaseException as exc:
            os.write(write_fd, describe(exc).encode()[:MAX_MESSAGE])
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as handle:
        message = handle.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return ""
    return message or f"the child exited with status {code}"
