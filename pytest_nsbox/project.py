"""The project's settings as the ``nsbox`` command sees them: the same ini file pytest would read
in the current directory, interpreted as the plugin interprets it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from . import compat
from .images import cache


def cache_dir_setting(value: str, rootdir: Path) -> Path:
    """The layer cache: ini ``nsbox_cache_dir`` (relative to the rootdir, as pytest's own
    ``cache_dir``), else ``$XDG_CACHE_HOME/pytest-nsbox``."""
    if not value:
        return cache.default_cache_dir()
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else rootdir / path


@dataclass(frozen=True)
class Project:
    """The rootdir and ini values of the project in a directory (no ini: the directory itself)."""

    rootdir: Path
    inifile: Path | None = None
    values: dict[str, object] = field(default_factory=dict)

    @classmethod
    def find(cls, directory: Path) -> Project:
        inifile, values = compat.project_ini(directory)
        return cls(inifile.parent if inifile is not None else directory, inifile, values)

    def ini(self, name: str) -> str:
        """A string setting ('' when unset)."""
        value = self.values.get(name, "")
        return " ".join(map(str, value)) if isinstance(value, list) else str(value).strip()

    def ini_lines(self, name: str) -> list[str]:
        """A ``linelist`` setting: one entry per line (or per TOML list item), blanks dropped."""
        value = self.values.get(name, [])
        lines = [str(item) for item in value] if isinstance(value, list) else str(value).splitlines()
        return [line.strip() for line in lines if line.strip()]

    def cache_dir(self, override: str = "") -> Path:
        return Path(override) if override else cache_dir_setting(self.ini("nsbox_cache_dir"), self.rootdir)

    def describe(self) -> str:
        return f"ini {self.inifile}" if self.inifile is not None else f"no ini file (rootdir {self.rootdir})"
