"""Resolve an ``image=`` value: "host", a recipe name, an imported image, or a rootfs directory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from . import oci, recipes

HOST: Final = "host"


class ImageError(Exception):
    """An image cannot be resolved; the message names the image and what was checked."""


Resolved = str | tuple[str, ...]  # "host", a rootfs directory, or layer directories (top first)


def resolve(name: str, rootdir: Path, cache: Path | None = None, image_dirs: Sequence[str] = ()) -> Resolved:
    """Return "host", the real path of a rootfs directory, or the layers (top first) of an
    imported image or a recipe (built on first use)."""
    if name == HOST:
        return HOST
    cache = cache or oci.default_cache_dir()
    if oci.is_reference(name):
        try:
            return tuple(oci.import_image(name, rootdir, cache))
        except oci.ImageImportError as exc:
            raise ImageError(str(exc)) from None
    dirs = recipes.search_dirs(rootdir, image_dirs)
    try:
        recipe = recipes.find(name, dirs)
        if recipe is not None:
            return tuple(recipes.Builder(cache, dirs).build(recipe)[::-1])
    except (recipes.RecipeError, oci.ImageImportError) as exc:
        raise ImageError(f"image {name!r}: {exc}") from None
    candidate = Path(name) if os.path.isabs(name) else rootdir / name
    if candidate.is_dir():
        real = os.path.realpath(candidate)
        if real == "/":
            raise ImageError(f"image {name!r} is the host's '/': use image='host' for an overlay of the running system")
        return real
    if candidate.exists():
        raise ImageError(f"image {name!r}: {candidate} is not a directory (expected a rootfs directory)")
    known = ", ".join(repr(n) for n in ["host", *recipes.known_images(dirs)])
    raise ImageError(
        f"unknown image {name!r}: not a recipe in {', '.join(str(d) for d in dirs)} and no rootfs directory at "
        f"{candidate}; known images: {known}, a rootfs directory, or oci:/oci-archive:/docker-archive:"
    )
