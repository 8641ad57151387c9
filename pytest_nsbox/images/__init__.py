"""Images: resolve an ``image=`` value ("host", a recipe name, an imported image, a rootfs
directory); ``oci`` imports OCI/Docker images, ``recipes`` builds recipes, ``extract`` unpacks a
layer safely, ``cache`` holds the layers. Errors are ``errors.ImageError``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from . import cache as layer_cache
from . import oci, recipes
from .errors import ImageError, ImageImportError, RecipeError

HOST: Final = "host"

__all__ = ["HOST", "ImageError", "ImageImportError", "RecipeError", "Resolved", "resolve"]


Resolved = str | tuple[str, ...]  # "host", a rootfs directory, or layer directories (top first)


def resolve(name: str, rootdir: Path, cache: Path | None = None, image_dirs: Sequence[str] = ()) -> Resolved:
    """Return "host", the real path of a rootfs directory, or the layers (top first) of an
    imported image or a recipe (built on first use)."""
    if name == HOST:
        return HOST
    cache = cache or layer_cache.default_cache_dir()
    if oci.is_reference(name):
        return tuple(oci.import_image(name, rootdir, cache))
    dirs = recipes.search_dirs(rootdir, image_dirs)
    try:
        recipe = recipes.find(name, dirs)
        if recipe is not None:
            return tuple(recipes.RecipeBuilder(cache, dirs).build(recipe)[::-1])
    except ImageError as exc:
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
