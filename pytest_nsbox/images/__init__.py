"""Images: resolve an ``image=`` value ("host", a recipe name, an imported image, a rootfs
directory); ``oci`` imports OCI/Docker images, ``recipes`` builds recipes, ``config`` reads and
checks an image's Env, WorkingDir and User, ``extract`` unpacks a layer safely, ``cache`` holds
the layers. Errors are ``errors.ImageError``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from . import cache as layer_cache
from . import oci, recipes
from .config import ImageConfig, ImageUser, resolve_user
from .errors import ImageError, ImageImportError, RecipeError

HOST: Final = "host"

__all__ = [
    "HOST",
    "ImageConfig",
    "ImageError",
    "ImageImportError",
    "ImageUser",
    "RecipeError",
    "Resolved",
    "ResolvedImage",
    "resolve",
]


Resolved = str | tuple[str, ...]  # "host", a rootfs directory, or layer directories (top first)


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    """What a sandbox is built from (*root*) and what the image asks of its processes: *config*
    and its User resolved, for imported images and recipes; None for "host" and a rootfs directory."""

    root: Resolved
    config: ImageConfig | None = None
    user: ImageUser | None = None


def resolve(name: str, rootdir: Path, cache: Path | None = None, image_dirs: Sequence[str] = ()) -> ResolvedImage:
    """Return "host", the real path of a rootfs directory, or the layers (top first) of an
    imported image or a recipe (built on first use), with the image's config."""
    if name == HOST:
        return ResolvedImage(HOST)
    cache = cache or layer_cache.default_cache_dir()
    if oci.is_reference(name):
        layers, config = oci.import_with_config(name, rootdir, cache)
        return ResolvedImage(tuple(layers), config, resolve_user(config, layers, name))
    dirs = recipes.search_dirs(rootdir, image_dirs)
    try:
        recipe = recipes.find(name, dirs)
        if recipe is not None:
            bottom_first, config = recipes.RecipeBuilder(cache, dirs).build_with_config(recipe)
            top_first = tuple(bottom_first[::-1])
            return ResolvedImage(top_first, config, resolve_user(config, top_first, name))
    except ImageError as exc:
        if str(exc).startswith(f"image {name!r}"):
            raise
        raise ImageError(f"image {name!r}: {exc}") from None
    candidate = Path(name) if os.path.isabs(name) else rootdir / name
    if candidate.is_dir():
        real = os.path.realpath(candidate)
        if real == "/":
            raise ImageError(f"image {name!r} is the host's '/': use image='host' for an overlay of the running system")
        return ResolvedImage(real)
    if candidate.exists():
        raise ImageError(f"image {name!r}: {candidate} is not a directory (expected a rootfs directory)")
    known = ", ".join(repr(n) for n in ["host", *recipes.known_images(dirs)])
    raise ImageError(
        f"unknown image {name!r}: not a recipe in {', '.join(str(d) for d in dirs)} and no rootfs directory at "
        f"{candidate}; known images: {known}, a rootfs directory, or oci:/oci-archive:/docker-archive:"
    )
