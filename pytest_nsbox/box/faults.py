"""A test hook: make one named setup step fail, to show that a failure anywhere fails closed.

``PYTEST_NSBOX_FAULT=STEP`` (or ``PROCESS:STEP``, e.g. ``C:enter_cgroup``) makes every step of
that name (in that process: P, A, B, C or J) raise ``OSError(EIO)`` instead of running: the
first one ends the setup. It can only make a step fail, never skip one, so it cannot weaken a
sandbox. The steps are those ``steps.run_steps`` runs, plus a few run on their own
(``steps.guard_parent``'s ``set_parent_death_signal``, forked B's ``harden_init``), P's
``create_cgroup`` and ``write_cgroup_limits`` (cgroups.py), and the private network's
``connect_network`` (process N, network.py). The variable is read once, when
this module is imported: by pytest (P; its forks inherit it) and by the builder (started with
P's environment: ``python -I`` ignores only ``PYTHON*`` variables).
"""

from __future__ import annotations

import errno
import os
from typing import Final

FAULT_ENV: Final = "PYTEST_NSBOX_FAULT"
FAULT_MESSAGE: Final = f"fault injected by {FAULT_ENV}"


def _parse(value: str) -> tuple[str | None, str] | None:
    value = value.strip()
    if not value:
        return None
    process, _, step = value.rpartition(":")
    return (process or None, step)


_FAULT: Final = _parse(os.environ.get(FAULT_ENV, ""))


def inject(process: str, step: str) -> None:
    """Raise the injected fault if ``PYTEST_NSBOX_FAULT`` names *step* (of *process*)."""
    if _FAULT is not None and _FAULT[1] == step and _FAULT[0] in (None, process):
        raise OSError(errno.EIO, FAULT_MESSAGE)
