"""The marker's signature, the size grammar, and option/ini precedence.

Everything here is pure: no syscalls, so it is unit-tested without a kernel.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

import pytest

from .errors import NsboxError

NetworkMode = Literal["none", "host", "private"]
NETWORKS: Final = ("none", "host", "private")
ScratchMode = Literal["memory", "disk"]
SCRATCHES: Final = ("memory", "disk")  # where a sandbox's writable places live: a tmpfs, or a host directory
DEFAULT_IMAGE: Final = "host"
DEFAULT_PIDS: Final = 1024  # the pids cap of a sandbox that asks for none (where cgroups allow)
SIZE_GRAMMAR: Final = "int bytes or '512K', '256M', '2G' (binary units)"
_SIZE_RE: Final = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)\s*$")
_SIZE_UNITS: Final = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
# Limits a test may expect to hit (expect_limits): the kernel counts their hits.
EXPECTABLE: Final = ("memory", "pids", "disk")
EXPECTABLE_GRAMMAR: Final = "'memory', 'pids', 'disk', or a tuple of them"
NOT_EXPECTABLE: Final = {
    "timeout": (
        "timeout is not a limit a test may expect: a test that wants something to run out of time "
        "uses its own timer (e.g. subprocess.run(..., timeout=5))"
    ),
    "cpus": "cpus is a bandwidth, never hit: there is nothing to expect",
}


class SpecError(NsboxError, ValueError):
    """A marker, option or ini value is invalid; the message names its source and the value."""


_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s)\s*$")
_DURATION_UNITS: Final = {"us": 1, "ms": 1000, "s": 1_000_000}
_RATE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)\s*$", re.IGNORECASE)
_RATE_UNITS: Final = {
    "bit": 1,
    "kbit": 10**3,
    "mbit": 10**6,
    "gbit": 10**9,
    "bps": 8,
    "kbps": 8 * 10**3,
    "mbps": 8 * 10**6,
    "gbps": 8 * 10**9,
}
_PERCENT_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_duration_us(value: object, what: str) -> int:
    """'100ms', '1.5s', '500us' (or a number of milliseconds) as microseconds."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{what}: expected a duration such as '100ms', '1s' or '500us'")
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(f"{what}: expected a duration such as '100ms', '1s' or '500us', got {value!r}")
        micros = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        micros = float(value) * 1000
    if not math.isfinite(micros) or micros < 0 or micros > 60_000_000:
        raise ValueError(f"{what}: must be between 0 and 60s, got {value!r}")
    return round(micros)


def parse_percent(value: object, what: str) -> float:
    """'10%' (or a number of percent) as a float in [0, 100]."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{what}: expected a percentage such as '10%'")
    if isinstance(value, str):
        match = _PERCENT_RE.match(value)
        if not match:
            raise ValueError(f"{what}: expected a percentage such as '10%', got {value!r}")
        percent = float(match.group(1))
    else:
        percent = float(value)
    if not math.isfinite(percent) or not 0 <= percent <= 100:
        raise ValueError(f"{what}: must be between 0% and 100%, got {value!r}")
    return percent


def parse_rate_bits(value: object, what: str) -> int:
    """'1mbit', '100kbit', '1mbps' (bytes) as bits per second (tc's units)."""
    if not isinstance(value, str) or not (match := _RATE_RE.match(value)):
        raise ValueError(f"{what}: expected a rate such as '1mbit', '100kbit' or '1mbps' (bytes), got {value!r}")
    bits = round(float(match.group(1)) * _RATE_UNITS[match.group(2).lower()])
    if bits < 8000:
        raise ValueError(f"{what}: at least 8kbit, got {value!r}")
    return bits


@dataclass(frozen=True, slots=True, init=False)
class Network:
    """A private network (``network="private"``) whose link to the test has faults: ``delay``
    ('100ms'), ``jitter`` ('10ms', with a delay), ``loss`` ('10%') and ``rate`` ('1mbit').

    Delay, jitter and loss need the kernel's netem queueing discipline (``sch_netem``); a test
    asking for them where it is missing is skipped, naming it. A rate alone uses TBF.
    """

    delay_us: int
    jitter_us: int
    loss_percent: float
    rate_bits: int | None

    def __init__(
        self,
        *,
        delay: str | float | None = None,
        jitter: str | float | None = None,
        loss: str | float | None = None,
        rate: str | None = None,
    ) -> None:
        set_field = object.__setattr__
        set_field(self, "delay_us", 0 if delay is None else parse_duration_us(delay, "delay"))
        set_field(self, "jitter_us", 0 if jitter is None else parse_duration_us(jitter, "jitter"))
        set_field(self, "loss_percent", 0.0 if loss is None else parse_percent(loss, "loss"))
        set_field(self, "rate_bits", None if rate is None else parse_rate_bits(rate, "rate"))
        if self.jitter_us and not self.delay_us:
            raise ValueError("jitter needs a delay (netem varies the delay by the jitter)")

    @property
    def needs_netem(self) -> bool:
        return bool(self.delay_us or self.jitter_us or self.loss_percent)

    def __repr__(self) -> str:
        parts = []
        if self.delay_us:
            parts.append(f"delay='{self.delay_us / 1000:g}ms'")
        if self.jitter_us:
            parts.append(f"jitter='{self.jitter_us / 1000:g}ms'")
        if self.loss_percent:
            parts.append(f"loss='{self.loss_percent:g}%'")
        if self.rate_bits is not None:
            parts.append(f"rate='{self.rate_bits}bit'")
        return f"Network({', '.join(parts)})"


def network_mode(network: NetworkMode | Network) -> NetworkMode:
    """The namespace arrangement of *network*: a Network is a private network with faults."""
    return "private" if isinstance(network, Network) else network


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """What one test's sandbox looks like. Limits are None when not requested."""

    image: str = DEFAULT_IMAGE
    memory: int | None = None  # bytes
    pids: int | None = None
    cpus: float | None = None
    timeout: float | None = None  # seconds, whole test (setup + call + teardown)
    network: NetworkMode | Network = "none"
    disk: int | None = None  # bytes; None: the default bound (P fills it in before the sandbox is built)
    # limits whose hit does not fail the test by itself (a subset of EXPECTABLE, in that order)
    expect_limits: tuple[str, ...] = ()
    drop_env: tuple[str, ...] | None = None  # fnmatch patterns of environment variables the test does not get
    scratch: ScratchMode = "memory"  # "disk": the writable places are a directory on the host's disk, not a tmpfs

    def requested_limits(self) -> dict[str, object]:
        """The resource limits this spec asks for, by marker argument name (public: hooks use it)."""
        limits = {"memory": self.memory, "pids": self.pids, "cpus": self.cpus, "timeout": self.timeout, "disk": self.disk}
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


MIN_DISK: Final = 2**20  # the sandbox's own files (init layer, mount points) need room


def _parse_disk(value: object) -> int:
    size = parse_size(value)
    if size < MIN_DISK:
        raise ValueError("at least 1M: the sandbox's own files need room")
    return size


def _parse_image(value: object) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected 'host', an image name, or a path to a rootfs directory")
    return value


def _parse_network(value: object) -> NetworkMode | Network:
    if isinstance(value, Network):
        return value
    if value not in NETWORKS:
        raise ValueError(f"expected one of {', '.join(repr(n) for n in NETWORKS)} or pytest_nsbox.Network(...)")
    return value  # type: ignore[return-value]


def _parse_scratch(value: object) -> ScratchMode:
    if value not in SCRATCHES:
        raise ValueError("expected 'memory' (a tmpfs, charged to the memory limit) or 'disk' (a directory on the host's disk)")
    return value  # type: ignore[return-value]


def _parse_expect_limits(value: object) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, tuple | list | set | frozenset) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"expected {EXPECTABLE_GRAMMAR}")
    for name in names:
        if name in NOT_EXPECTABLE:
            raise ValueError(NOT_EXPECTABLE[name])
        if name not in EXPECTABLE:
            close = difflib.get_close_matches(name, EXPECTABLE, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{name!r} is not a limit a test may expect; {hint}expected {EXPECTABLE_GRAMMAR}")
    return tuple(name for name in EXPECTABLE if name in names)


PARSERS: Final[Mapping[str, Callable[[object], object]]] = {
    "image": _parse_image,
    "memory": parse_size,
    "pids": _parse_positive_int,
    "cpus": lambda v: _parse_positive_float(v, "a positive number of CPUs, e.g. 0.5"),
    "timeout": lambda v: _parse_positive_float(v, "a positive number of seconds"),
    "network": _parse_network,
    "disk": lambda v: _parse_disk(v),
    "expect_limits": _parse_expect_limits,
    "drop_env": lambda v: parse_drop_env(v),
    "scratch": _parse_scratch,
}


def parse_field(name: str, value: object, source: str) -> object:
    """Parse one spec field; a bad value raises SpecError naming *source* and the value."""
    try:
        return PARSERS[name](value)
    except ValueError as exc:
        raise SpecError(f"invalid {name} {value!r} from {source} ({exc})") from None


class _Unset:
    """Marks a marker argument that was not given (None given means: turn that default off)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()
FIELDS: Final = ("image", "memory", "pids", "cpus", "timeout", "network", "disk", "expect_limits", "drop_env", "scratch")
# Limits a marker may turn off (None or 0) for one test. pids and disk cannot go unbounded:
# None/0 drops a command-line or ini default, and the built-in bound (DEFAULT_PIDS, the default
# disk bound) still applies.
SWITCHABLE: Final = ("memory", "pids", "cpus", "timeout", "disk", "drop_env")  # drop_env=None: drop nothing


def marker_signature(
    image: str | os.PathLike[str] | _Unset | None = UNSET,
    *,
    memory: int | str | _Unset | None = UNSET,
    pids: int | _Unset | None = UNSET,
    cpus: float | _Unset | None = UNSET,
    timeout: float | _Unset | None = UNSET,
    network: NetworkMode | Network | _Unset | None = UNSET,
    disk: int | str | _Unset | None = UNSET,
    expect_limits: str | Iterable[str] | _Unset | None = UNSET,
    drop_env: str | Iterable[str] | _Unset | None = UNSET,
    scratch: ScratchMode | _Unset | None = UNSET,
) -> dict[str, object]:
    """The ``nsbox`` marker's signature: Python writes the 'unexpected keyword' errors."""
    given = {
        "image": image,
        "memory": memory,
        "pids": pids,
        "cpus": cpus,
        "timeout": timeout,
        "network": network,
        "disk": disk,
        "expect_limits": expect_limits,
        "drop_env": drop_env,
        "scratch": scratch,
    }
    return {name: value for name, value in given.items() if value is not UNSET}


def nsbox(
    image: str | os.PathLike[str] | Callable[..., Any] | _Unset | None = UNSET,
    *,
    memory: int | str | _Unset | None = UNSET,
    pids: int | _Unset | None = UNSET,
    cpus: float | _Unset | None = UNSET,
    timeout: float | _Unset | None = UNSET,
    network: NetworkMode | Network | _Unset | None = UNSET,
    disk: int | str | _Unset | None = UNSET,
    expect_limits: str | Iterable[str] | _Unset | None = UNSET,
    drop_env: str | Iterable[str] | _Unset | None = UNSET,
    scratch: ScratchMode | _Unset | None = UNSET,
) -> Any:
    """Run the test in fresh namespaces over a throwaway overlay of rootfs *image*.

    Same as ``@pytest.mark.nsbox(...)``; also usable bare, as ``@nsbox``.
    ``memory`` is int bytes or '512K'/'256M'/'2G'; ``pids`` a process cap; ``cpus`` CPU
    bandwidth (0.5 = half a CPU); ``timeout`` wall-clock seconds; ``network`` 'none', 'host', 'private' or
    ``Network(delay=..., loss=...)``;
    ``disk`` a size bounding everything the test writes (the writable layer, /tmp, /run, /dev/shm).
    ``None`` or ``0`` for a limit turns a command-line or ini default off for this test (pids and
    disk: down to the built-in bounds, 1024 processes and the default disk bound).
    ``expect_limits`` ('memory', 'pids', 'disk', or a tuple of them) names limits the test means
    to hit: a process it starts OOM-killed, forks refused, or ENOSPC do not fail it by themselves.
    ``drop_env`` (a pattern or a list of them, e.g. ``["*_TOKEN", "AWS_*"]``): environment variables
    the test does not get (over ini ``nsbox_drop_env``; ``None`` drops none).
    ``scratch`` 'memory' (default: the writable places are a tmpfs) or 'disk' (a directory on the
    host's disk, not charged to the memory limit; the disk bound is enforced by P, see the README).
    """
    if callable(image) and not isinstance(image, str | os.PathLike):
        return pytest.mark.nsbox(image)
    kwargs = marker_signature(
        image,
        memory=memory,
        pids=pids,
        cpus=cpus,
        timeout=timeout,
        network=network,
        disk=disk,
        expect_limits=expect_limits,
        drop_env=drop_env,
        scratch=scratch,
    )
    return pytest.mark.nsbox(**kwargs)


@dataclass(frozen=True, slots=True)
class Defaults:
    """Spec defaults from the command line over the ini file, parsed once at configure time.

    *sources* says where each field that is not the built-in default came from (for the header).
    """

    spec: SandboxSpec = SandboxSpec()
    sources: Mapping[str, str] = field(default_factory=dict)


INI_FIELDS: Final = {
    "nsbox_image": "image",
    "nsbox_memory": "memory",
    "nsbox_pids": "pids",
    "nsbox_cpus": "cpus",
    "nsbox_timeout": "timeout",
    "nsbox_disk": "disk",
    "nsbox_scratch": "scratch",
}
OPTION_FIELDS: Final = {f"--nsbox-{field}": field for field in INI_FIELDS.values()}
_OFF_WORDS: Final = ("0", "none", "off")


def _parse_default(name: str, raw: str, source: str) -> object:
    """A command-line or ini value; '0'/'none'/'off' turns a limit off (a lower layer's too)."""
    if name in SWITCHABLE and raw.strip().lower() in _OFF_WORDS:
        return None
    return parse_field(name, raw, source)


def defaults_from(read_ini: Callable[[str], str], options: Mapping[str, str | None] | None = None) -> Defaults:
    """Build defaults: the command line (*options*: option name -> raw value, None when not given)
    over the ini values (empty: not set) over the built-in defaults. Raises SpecError."""
    fields: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for ini_name, name in INI_FIELDS.items():
        raw = read_ini(ini_name).strip()
        if raw:
            fields[name] = _parse_default(name, raw, f"ini {ini_name}")
            sources[name] = "ini"
    for option, name in OPTION_FIELDS.items():
        raw_option = (options or {}).get(option)
        if raw_option is not None:
            fields[name] = _parse_default(name, raw_option, f"option {option}")
            sources[name] = "command line"
    if fields.get("image", DEFAULT_IMAGE) is None:
        fields["image"] = DEFAULT_IMAGE
    return Defaults(replace(SandboxSpec(), **fields), sources)


def defaults_from_ini(read_ini: Callable[[str], str]) -> Defaults:
    """Build defaults from ini values only (see defaults_from)."""
    return defaults_from(read_ini)


@dataclass(frozen=True, slots=True)
class Mark:
    """One nsbox marker on a test: its arguments, and *level*, the node it was applied to
    (the test, its class, its module...); 0 is the test itself, higher is farther."""

    args: tuple[object, ...]
    kwargs: Mapping[str, object]
    level: int = 0


def _given(mark: Mark, source: str) -> dict[str, object]:
    """The keywords one marker sets, checked against the signature."""
    try:
        given = marker_signature(*mark.args, **mark.kwargs)  # type: ignore[arg-type]
    except TypeError as exc:
        message = f"{source}: {exc}".replace("marker_signature()", "nsbox()")
        unknown = [k for k in mark.kwargs if k not in FIELDS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], FIELDS, n=1)
            message += f" (did you mean {close[0]!r}?)" if close else ""
            message += f"; valid keywords: {', '.join(FIELDS)}"
        raise SpecError(message) from None
    # image and network have no default to turn off: None there means "not given"; expect_limits=None
    # expects nothing (over an outer marker's expect_limits)
    return {name: value for name, value in given.items() if value is not None or name in (*SWITCHABLE, "expect_limits")}


def _parse_marker_field(name: str, value: object, source: str) -> object:
    if name in SWITCHABLE and (value is None or (value == 0 and not isinstance(value, bool))):
        return None  # off for this test (pids: the safety cap still applies)
    if name == "expect_limits" and value is None:
        return ()
    return parse_field(name, value, source)


def check_expected_limits(spec: SandboxSpec, source: str) -> None:
    """Each limit *spec* expects must be one it sets: otherwise there is nothing to expect."""
    for name in spec.expect_limits:
        if getattr(spec, name) is None:
            built_in = {"pids": f"the safety cap of {DEFAULT_PIDS}", "disk": "the built-in disk bound"}.get(name)
            cap = f" ({built_in} is not a limit a test may expect)" if built_in else ""
            raise SpecError(
                f"{source}: expect_limits names {name}, but the test has no {name} limit{cap}; "
                f"give {name}=... in the marker (or --nsbox-{name}, ini nsbox_{name}), or drop {name!r} from expect_limits"
            )


def spec_from_markers(marks: list[Mark], nodeid: str, defaults: Defaults) -> SandboxSpec:
    """Merge stacked nsbox markers over the defaults. Raises SpecError naming the test.

    The rule: per keyword, the marker closest to the test wins (the test's own over its class's
    over its module's); two markers on the same level that give one keyword different values
    are an error.
    """
    source = f"nsbox marker on {nodeid}"
    chosen: dict[str, tuple[int, object]] = {}
    for mark in sorted(marks, key=lambda m: m.level):
        for name, value in _given(mark, source).items():
            if name not in chosen:
                chosen[name] = (mark.level, value)
            elif chosen[name][0] == mark.level and chosen[name][1] != value:
                raise SpecError(
                    f"{source}: stacked nsbox markers on one level give {name} two values "
                    f"({chosen[name][1]!r} and {value!r}); keep one"
                )
    fields = {name: _parse_marker_field(name, value, source) for name, (_, value) in chosen.items()}
    spec = replace(defaults.spec, **fields)  # type: ignore[arg-type]
    check_expected_limits(spec, source)
    return spec


def spec_from_marker(args: tuple[object, ...], kwargs: Mapping[str, object], nodeid: str, defaults: Defaults) -> SandboxSpec:
    """Merge one marker's arguments over the defaults. Raises SpecError naming the test."""
    return spec_from_markers([Mark(args, kwargs)], nodeid, defaults)


def describe_defaults(defaults: Defaults, default_disk: int | None = None) -> str:
    """The active defaults, for the pytest header: ``image=host, pids=1024 (built-in), memory=256 MiB (ini)``;
    *default_disk* is the built-in disk bound of this run."""
    spec, sources = defaults.spec, defaults.sources
    parts = [f"image={spec.image}" + (f" ({sources['image']})" if "image" in sources else "")]
    shown: dict[str, str | None] = {
        "memory": format_size(spec.memory) if spec.memory is not None else None,
        "pids": str(spec.pids) if spec.pids is not None else None,
        "cpus": f"{spec.cpus:g}" if spec.cpus is not None else None,
        "timeout": f"{spec.timeout:g}s" if spec.timeout is not None else None,
        "disk": format_size(spec.disk) if spec.disk is not None else None,
    }
    for name, text in shown.items():
        if text is not None:
            parts.append(f"{name}={text} ({sources.get(name, 'built-in')})")
        elif name == "pids":
            parts.append(f"pids={DEFAULT_PIDS} (built-in)")
        elif name == "disk" and default_disk is not None:
            parts.append(f"disk={format_size(default_disk)} (built-in)")
    if spec.scratch != "memory":
        parts.append(f"scratch={spec.scratch} ({sources.get('scratch', 'built-in')})")
    if spec.drop_env:
        parts.append(f"drop_env={' '.join(spec.drop_env)} ({sources.get('drop_env', 'built-in')})")
    return ", ".join(parts)


# --- drop_env: environment variables a test does not get --------------------------------------

DROP_ENV_INI: Final = "nsbox_drop_env"
DROP_ENV_GRAMMAR: Final = "a pattern or a list of fnmatch patterns of variable names, e.g. ['*_TOKEN', 'AWS_*']"


def parse_drop_env(value: object) -> tuple[str, ...] | None:
    """Patterns of variable names (fnmatch: ``*``, ``?``, ``[...]``; case-sensitive); None for none."""
    patterns = (value,) if isinstance(value, str) else value
    if not isinstance(patterns, list | tuple) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"expected {DROP_ENV_GRAMMAR}")
    for pattern in patterns:
        if not pattern.strip() or "=" in pattern or pattern != pattern.strip():
            raise ValueError(f"{pattern!r} cannot name a variable (no blank, no '=')")
    return tuple(dict.fromkeys(patterns)) or None


def with_drop_env(defaults: Defaults, ini_patterns: list[str]) -> Defaults:
    """*defaults* with ini ``nsbox_drop_env`` (a linelist) as the drop_env default. Raises SpecError."""
    if not ini_patterns:
        return defaults
    drop_env = parse_field("drop_env", list(ini_patterns), f"ini {DROP_ENV_INI}")
    return Defaults(replace(defaults.spec, drop_env=drop_env), {**defaults.sources, "drop_env": "ini"})  # type: ignore[arg-type]
