"""Resolve an ``image=`` value to what the mount plan needs: "host" or a rootfs directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

HOST: Final = "host"
NOT_YET_SUPPORTED_PREFIXES: Final = ("oci:", "oci-archive:", "docker-archive:")


class ImageError(Exception):
    """An image cannot be resolved; the message names the image and what was checked."""


def resolve(name: str, rootdir: Path) -> str:
    """Return "host" or the absolute real path of a rootfs directory for *name*."""
    if name == HOST:
        return HOST
    if name.startswith(NOT_YET_SUPPORTED_PREFIXES):
        raise ImageError(f"image {name!r}: OCI and docker-archive images are not supported yet")
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
