"""Parsing of kernel release strings (which decides whether sandboxes can be prebuilt)."""

from __future__ import annotations

import pytest

from pytest_nsbox.probe import PIDFD_SETNS_KERNEL, kernel_version


@pytest.mark.parametrize(
    ("release", "expected"),
    [
        ("6.18.44-fc-v595", (6, 18)),
        ("6.1.0-13-amd64", (6, 1)),
        ("5.8.0", (5, 8)),
        ("5.4.0-150-generic", (5, 4)),
        ("4.19.0+", (4, 19)),
        ("6.10-rc1", (6, 10)),
        ("garbage", (0, 0)),
        ("", (0, 0)),
    ],
)
def test_kernel_version(release: str, expected: tuple[int, int]) -> None:
    assert kernel_version(release) == expected


def test_prebuilding_needs_pidfd_setns() -> None:
    assert kernel_version("5.7.19") < PIDFD_SETNS_KERNEL <= kernel_version("5.8.0")
