"""The marker's signature, the size grammar, and option/ini precedence.

Everything here is pure: no syscalls, so it is unit-tested without a kernel.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

import pytest

from .errors import NsboxError

Network = Literal["none", "host"]
NETWORKS: Final = ("none", "host")
DEFAULT_IMAGE: Final = "host"
DEFAULT_PIDS: Final = 1024  # the pids cap of a sandbox that asks for none (where cgroups allow)
SIZE_GRAMMAR: Final = "int bytes or '512K', '256M', '2G' (binary units)"
_SIZE_RE: Final = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)\s*$")
_SIZE_UNITS: Final = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


class SpecError(NsboxError, ValueError):
    """A marker, option or ini value is invalid; the message names its source and the value."""


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """What one test's sandbox looks like. Limits are None when not requested."""

    image: str = DEFAULT_IMAGE
    memory: int | None = None  # bytes
    pids: int | None = None
    cpus: float | None = None
    timeout: float | None = None  # seconds, whole test (setup + call + teardown)
    network: Network = "none"

    def requested_limits(self) -> dict[str, object]:
        """The resource limits this spec asks for, by marker argument name (public: hooks use it)."""
        limits = {"memory": self.memory, "pids": self.pids, "cpus": self.cpus, "timeout": self.timeout}
        return {name: value for name, value in limits.items() if value is not None}


def format_size(size: int) -> str:
    """Render bytes in the largest binary unit that keeps one decimal: ``256 MiB``."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            value = size / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} B"


def parse_size(value: object) -> int:
    """Parse a memory size: int bytes or a string with an optional binary unit (K, M, G, T)."""
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_GRAMMAR}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            raise ValueError(f"expected {SIZE_GRAMMAR}")
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    else:
        raise ValueError(f"expected {SIZE_GRAMMAR}, got {type(value).__name__}")
    if size <= 0:
        raise ValueError(f"must be positive ({SIZE_GRAMMAR})")
    return size


def _parse_positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected a positive integer")
    try:
        number = int(value)
    except ValueError:
        raise ValueError("expected a positive integer") from None
    if number <= 0:
        raise ValueError("expected a positive integer")
    return number


def _parse_positive_float(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {what}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected {what}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"expected {what}")
    return number


def _parse_image(value: object) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected 'host', an image name, or a path to a rootfs directory")
    return value


def _parse_network(value: object) -> Network:
    if value not in NETWORKS:
        raise ValueError(f"expected one of {', '.join(repr(n) for n in NETWORKS)}")
    return value  # type: ignore[return-value]


PARSERS: Final[Mapping[str, Callable[[object], object]]] = {
    "image": _parse_image,
    "memory": parse_size,
    "pids": _parse_positive_int,
    "cpus": lambda v: _parse_positive_float(v, "a positive number of CPUs, e.g. 0.5"),
    "timeout": lambda v: _parse_positive_float(v, "a positive number of seconds"),
    "network": _parse_network,
}


def parse_field(name: str, value: object, source: str) -> object:
    """Parse one spec field; a bad value raises SpecError naming *source* and the value."""
    try:
        return PARSERS[name](value)
    except ValueError as exc:
        raise SpecError(f"invalid {name} {value!r} from {source} ({exc})") from None


def marker_signature(
    image: str | os.PathLike[str] | None = None,
    *,
    memory: int | str | None = None,
    pids: int | None = None,
    cpus: float | None = None,
    timeout: float | None = None,
    network: Network | None = None,
) -> dict[str, object]:
    """The ``nsbox`` marker's signature: Python writes the 'unexpected keyword' errors."""
    given = {"image": image, "memory": memory, "pids": pids, "cpus": cpus, "timeout": timeout, "network": network}
    return {name: value for name, value in given.items() if value is not None}


def nsbox(
    image: str | os.PathLike[str] | Callable[..., Any] | None = None,
    *,
    memory: int | str | None = None,
    pids: int | None = None,
    cpus: float | None = None,
    timeout: float | None = None,
    network: Network | None = None,
) -> Any:
    """Run the test in fresh namespaces over a throwaway overlay of rootfs *image*.

    Same as ``@pytest.mark.nsbox(...)``; also usable bare, as ``@nsbox``.
    ``memory`` is int bytes or '512K'/'256M'/'2G'; ``pids`` a process cap; ``cpus`` CPU
    bandwidth (0.5 = half a CPU); ``timeout`` wall-clock seconds; ``network`` 'none' or 'host'.
    """
    if callable(image) and not isinstance(image, str | os.PathLike):
        return pytest.mark.nsbox(image)
    kwargs = marker_signature(image, memory=memory, pids=pids, cpus=cpus, timeout=timeout, network=network)
    return pytest.mark.nsbox(**kwargs)


@dataclass(frozen=True, slots=True)
class Defaults:
    """Spec defaults from the ini file, parsed once at configure time."""

    spec: SandboxSpec = SandboxSpec()


INI_FIELDS: Final = {"nsbox_image": "image", "nsbox_memory": "memory", "nsbox_pids": "pids", "nsbox_timeout": "timeout"}


def defaults_from_ini(read_ini: Callable[[str], str]) -> Defaults:
    """Build defaults from ini values; empty values mean 'not set'. Raises SpecError."""
    fields: dict[str, Any] = {}
    for ini_name, field in INI_FIELDS.items():
        raw = read_ini(ini_name).strip()
        if raw:
            fields[field] = parse_field(field, raw, f"ini {ini_name}")
    return Defaults(replace(SandboxSpec(), **fields))


def spec_from_marker(args: tuple[object, ...], kwargs: Mapping[str, object], nodeid: str, defaults: Defaults) -> SandboxSpec:
    """Merge marker arguments over the ini defaults. Raises SpecError naming the test."""
    source = f"nsbox marker on {nodeid}"
    try:
        given = marker_signature(*args, **kwargs)  # type: ignore[arg-type]
    except TypeError as exc:
        raise SpecError(f"{source}: {exc}".replace("marker_signature()", "nsbox()")) from None
    fields = {name: parse_field(name, value, source) for name, value in given.items()}
    return replace(defaults.spec, **fields)  # type: ignore[arg-type]
