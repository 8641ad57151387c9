"""The one exception base of pytest-nsbox: what was attempted, why it failed, how to fix it.

Imports nothing, so every layer (the mechanism in ``box/`` included) can raise it. ``plugin.py``
and ``cli.py`` each catch ``NsboxError`` once and decide between skip, failure and usage error.
"""

from __future__ import annotations


class NsboxError(Exception):
    """A failure the user can act on: rendered as ``<what>: <why>. Hint: <fix>``."""

    def __init__(self, what: str, why: str = "", fix: str = "") -> None:
        self.what = what
        self.why = why
        self.fix = fix
        super().__init__(what, why, fix)

    def __str__(self) -> str:
        text = f"{self.what}: {self.why}" if self.why else self.what
        return f"{text}. Hint: {self.fix}" if self.fix else text
