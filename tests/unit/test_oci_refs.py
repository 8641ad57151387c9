"""Image references and the overlay option-length workaround."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_nsbox.box import mounts
from pytest_nsbox.images import extract, oci


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("oci:img", ("oci", "/base/img", None)),
        ("oci:/abs/img:v1", ("oci", "/abs/img", "v1")),
        ("oci-archive:app.tar:latest", ("oci-archive", "/base/app.tar", "latest")),
        ("docker-archive:app.tar", ("docker-archive", "/base/app.tar", None)),
    ],
)
def test_parse_reference(name: str, expected: tuple[str, str, str | None]) -> None:
    kind, path, tag = oci.parse_reference(name, Path("/base"))
    assert (kind, str(path), tag) == expected


def test_empty_reference_is_an_error() -> None:
    with pytest.raises(oci.ImageImportError, match="no path after oci"):
        oci.parse_reference("oci:", Path("/base"))


def test_short_lowers_keeps_short_lists(tmp_path: Path) -> None:
    assert mounts.short_lowers(["/a", "/b"], str(tmp_path)) == (None, ("/a", "/b"))


def test_short_lowers_numbers_long_lists_through_symlinks(tmp_path: Path) -> None:
    lowers = [f"/cache/layers/sha256/{i:064x}" for i in range(400)]
    cwd, names = mounts.short_lowers(lowers, str(tmp_path / "stacks"))
    assert cwd is not None and names[:3] == ("0", "1", "2") and len(names) == 400
    assert os.readlink(os.path.join(cwd, "399")) == lowers[399]
    assert sum(len(n) + 1 for n in names) < 4096
    assert mounts.short_lowers(lowers, str(tmp_path / "stacks")) == (cwd, names)  # published once


def test_components_refuse_escapes() -> None:
    assert extract._components("./a/./b/") == ["a", "b"]
    for bad in ("../x", "a/../../x", "/etc/passwd"):
        with pytest.raises(extract.RefusedMember):
            extract._components(bad)
