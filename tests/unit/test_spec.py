"""Marker signature, size grammar, ini precedence."""

from __future__ import annotations

import pytest

from pytest_nsbox import nsbox
from pytest_nsbox.spec import Defaults, SandboxSpec, SpecError, defaults_from_ini, format_size, parse_size, spec_from_marker


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1), (4096, 4096), ("512K", 512 * 2**10), ("256M", 256 * 2**20), ("2G", 2 * 2**30), ("1g", 2**30), ("100", 100)],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["lots", "256MB", "1.5G", "-1", "", 0, -5, True, 1.5, None, "2 G B"])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"expected int bytes|must be positive"):
        parse_size(value)


@pytest.mark.parametrize(("size", "text"), [(256 * 2**20, "256 MiB"), (1536, "1.5 KiB"), (2**30, "1 GiB"), (10, "10 B")])
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def test_marker_overrides_ini_defaults() -> None:
    ini = {"nsbox_image": "tests/images/tiny", "nsbox_memory": "64M", "nsbox_pids": "", "nsbox_timeout": "5"}
    defaults = defaults_from_ini(ini.__getitem__)
    assert defaults.spec == SandboxSpec(image="tests/images/tiny", memory=64 * 2**20, timeout=5.0)
    spec = spec_from_marker((), {"memory": "1G", "network": "host"}, "t.py::test_x", defaults)
    assert spec == SandboxSpec(image="tests/images/tiny", memory=2**30, timeout=5.0, network="host")
    assert spec_from_marker(("host",), {}, "t.py::test_x", defaults).image == "host"


def test_bad_ini_value_names_the_ini_key() -> None:
    ini = {"nsbox_image": "", "nsbox_memory": "", "nsbox_pids": "many", "nsbox_timeout": ""}
    with pytest.raises(SpecError, match=r"invalid pids 'many' from ini nsbox_pids \(expected a positive integer\)"):
        defaults_from_ini(ini.__getitem__)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {"memory": "lots"}, "invalid memory 'lots' from nsbox marker on t.py::test_x (expected int bytes"),
        ((), {"pids": 0}, "invalid pids 0 from nsbox marker on t.py::test_x"),
        ((), {"cpus": "all"}, "invalid cpus 'all' from nsbox marker on t.py::test_x"),
        ((), {"timeout": float("inf")}, "invalid timeout inf from nsbox marker on t.py::test_x"),
        ((), {"network": "veth"}, "invalid network 'veth' from nsbox marker on t.py::test_x (expected one of 'none', 'host')"),
        ((), {"memroy": 1}, "nsbox marker on t.py::test_x: nsbox() got an unexpected keyword argument 'memroy'"),
        (("a", "b"), {}, "nsbox marker on t.py::test_x: nsbox() takes from 0 to 1 positional arguments but 2 were given"),
    ],
)
def test_bad_marker_values_name_test_and_value(args: tuple[object, ...], kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as exc:
        spec_from_marker(args, kwargs, "t.py::test_x", Defaults())
    assert str(exc.value).startswith(message)



def test_decorator_matches_marker() -> None:
    mark = nsbox(image="busybox", memory="256M").mark
    assert (mark.name, mark.args, mark.kwargs) == ("nsbox", (), {"image": "busybox", "memory": "256M"})

    @nsbox
    def test_bare() -> None: ...

    assert [m.name for m in test_bare.pytestmark] == ["nsbox"]  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        nsbox(memroy="1G")  # type: ignore[call-arg]


def test_requested_limits() -> None:
    assert SandboxSpec().requested_limits() == {}
    assert SandboxSpec(memory=1, timeout=2.0).requested_limits() == {"memory": 1, "timeout": 2.0}
