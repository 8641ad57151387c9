"""A real project's own test suite gives the same summary plain and with --nsbox-all."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Final

import pytest
from helpers import summary_line

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns, pytest.mark.slow]

MORE_ITERTOOLS: Final = "more-itertools==11.2.1"  # its sdist ships tests/, which use subtests heavily


def cached_sdist(requirement: str) -> Path:
    """The unpacked sdist of *requirement*, downloaded once into the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pytest-nsbox-tests"
    target = cache / requirement.replace("==", "-")
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", requirement, "-d", scratch]
        subprocess.run(command, check=True, timeout=600)
        (archive,) = Path(scratch).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(scratch, filter="data")
            else:  # Python < 3.11.4 (Debian 12's 3.11.2, the rootless run): check the members ourselves
                for member in tar.getmembers():
                    unsafe = member.name.startswith("/") or ".." in Path(member.name).parts
                    if unsafe or not (member.isfile() or member.isdir()):
                        raise ValueError(f"{archive.name}: refusing member {member.name!r}")
                tar.extractall(scratch)
        (unpacked,) = (p for p in Path(scratch).iterdir() if p.is_dir())
        try:
            unpacked.rename(target)  # atomic: a concurrent run may have published it meanwhile
        except OSError:
            if not target.is_dir():
                raise
    return target


def test_more_itertools_suite_summary_is_identical(pytester: pytest.Pytester) -> None:
    source = cached_sdist(MORE_ITERTOOLS)
    for name in ("more_itertools", "tests"):
        shutil.copytree(source / name, pytester.path / name)
    args = ("-p", "no:cacheprovider", "-q", "tests")  # -q: pytest counts passed subtests
    plain = pytester.runpytest_subprocess(*args, timeout=1800)
    sandboxed = pytester.runpytest_subprocess("--nsbox-all", *args, timeout=1800)
    print("plain:    ", summary_line(plain))
    print("sandboxed:", summary_line(sandboxed))
    assert "subtests passed" in summary_line(plain)
    assert summary_line(sandboxed) == summary_line(plain)
