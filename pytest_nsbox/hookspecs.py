"""Hooks pytest-nsbox offers to other plugins.

Implement them in a conftest.py or plugin; when pytest-nsbox is not installed they are never
called, so no import of this module is needed (use ``@pytest.hookimpl(optionalhook=True)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .box.config import SandboxResult
    from .spec import SandboxSpec


@pytest.hookspec(firstresult=True)
def pytest_nsbox_resolve_image(config: pytest.Config, name: str) -> str | None:
    """Return the rootfs directory (or "host") for image *name*, or None to defer.

    An image given this way has no config: its tests keep pytest's environment.

    .. versionadded:: 0.1
    """


@pytest.hookspec(firstresult=True)
def pytest_nsbox_modify_spec(item: pytest.Item, spec: SandboxSpec) -> SandboxSpec | None:
    """Return a changed spec for *item* (e.g. ``dataclasses.replace(spec, network="host")``), or None.

    A changed spec whose ``expect_limits`` names a limit it does not set is an error of the test.

    .. versionadded:: 0.1
    """


@pytest.hookspec()
def pytest_nsbox_sandbox_finished(item: pytest.Item, spec: SandboxSpec, result: SandboxResult) -> None:
    """Called in the pytest process after *item*'s sandbox is gone, before its reports are logged.

    .. versionadded:: 0.1
    """
