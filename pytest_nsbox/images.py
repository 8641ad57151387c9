"""Resolve an ``image=`` value to what the mount plan needs: "host" or a rootfs directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from . import oci

HOST: Final = "host"


class ImageError(Exception):
    """An image cannot be resolved; the message names the image and what was checked."""


Resolved = str | tuple[str, ...]  # "host", a rootfs directory, or layer directories (top first)


def resolve(name: str, rootdir: Path, cache: Path | None = None) -> Resolved:
    """Return "host", the real path of a rootfs directory, or the imported layers of *name*."""
    if name == HOST:
        return HOST
    if oci.is_reference(name):
        try:
            return tuple(oci.import_image(name, rootdir, cache or oci.default_cache_dir()))
        except oci.ImageImportError as exc:
            raise ImageError(str(exc)) from None
    candidate = Path(name) if os.path.isabs(name) else rootdir / name
    if candidate.is_dir():
        real = os.path.realpath(candidate)
        if real == "/":
            raise ImageError(f"image {name!r} is the host's '/': use image='host' for an overlay of the running system")
        return real
    if candidate.exists():
        raise ImageError(f"image {name!r}: {candidate} is not a directory (expected a rootfs directory)")
    raise ImageError(
        f"unknown image {name!r}: not 'host' and no rootfs directory at {candidate}; known images: 'host', or a path"
    )
