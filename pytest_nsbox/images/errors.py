"""The errors of image resolution, import and recipe builds (all NsboxError)."""

from __future__ import annotations

from ..errors import NsboxError


class ImageError(NsboxError):
    """An image cannot be resolved, imported or built; the message names the image and what failed."""


class ImageImportError(ImageError):
    """An image or one of its layers cannot be imported; the message names image, layer, member."""


class RecipeError(ImageError):
    """A recipe is invalid or its build failed; the message names the file and the field or step."""
