"""tests/compat: pytest-nsbox together with the plugins people combine it with.

Run in a venv with pyproject.toml's ``compat`` extra (``tools/dev.sh compat``), never in the main
venv: pytest-randomly and pytest-rerunfailures change every run they are installed in. The inner
runs (``run_inner``) see the same pinned plugins; a missing one is an error, not a skip.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def compat_pins() -> dict[str, str]:
    """{distribution: version} of pyproject.toml's compat extra."""
    extra = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["compat"]
    return dict(pin.split("==", 1) for pin in extra)


def pytest_sessionstart(session: pytest.Session) -> None:
    wrong = {}
    for name, version in compat_pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != version:
            wrong[name] = f"{installed} (pinned {version})"
    if wrong:
        raise pytest.UsageError(f"tests/compat needs the compat extra (tools/dev.sh compat); here: {wrong}")
