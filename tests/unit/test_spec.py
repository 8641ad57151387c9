"""Marker signature, size grammar, ini precedence."""

from __future__ import annotations

import pytest

from pytest_nsbox import nsbox
from pytest_nsbox.spec import (
    DEFAULT_PIDS,
    Defaults,
    Mark,
    SandboxSpec,
    SpecError,
    defaults_from,
    defaults_from_ini,
    describe_defaults,
    format_size,
    parse_drop_env,
    parse_size,
    spec_from_marker,
    spec_from_markers,
    with_drop_env,
)


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
    ini = {"nsbox_image": "tests/images/tiny", "nsbox_memory": "64M", "nsbox_pids": "", "nsbox_cpus": "", "nsbox_timeout": "5"}
    ini["nsbox_disk"] = ini["nsbox_scratch"] = ""
    defaults = defaults_from_ini(ini.__getitem__)
    assert defaults.spec == SandboxSpec(image="tests/images/tiny", memory=64 * 2**20, timeout=5.0)
    spec = spec_from_marker((), {"memory": "1G", "network": "host"}, "t.py::test_x", defaults)
    assert spec == SandboxSpec(image="tests/images/tiny", memory=2**30, timeout=5.0, network="host")
    assert spec_from_marker(("host",), {}, "t.py::test_x", defaults).image == "host"


def test_bad_ini_value_names_the_ini_key() -> None:
    ini = {
        "nsbox_image": "",
        "nsbox_memory": "",
        "nsbox_pids": "many",
        "nsbox_cpus": "",
        "nsbox_timeout": "",
        "nsbox_disk": "",
        "nsbox_scratch": "",
    }
    with pytest.raises(SpecError, match=r"invalid pids 'many' from ini nsbox_pids \(expected a positive integer\)"):
        defaults_from_ini(ini.__getitem__)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {"memory": "lots"}, "invalid memory 'lots' from nsbox marker on t.py::test_x (expected int bytes"),
        ((), {"pids": -1}, "invalid pids -1 from nsbox marker on t.py::test_x"),
        ((), {"cpus": "all"}, "invalid cpus 'all' from nsbox marker on t.py::test_x"),
        ((), {"timeout": float("inf")}, "invalid timeout inf from nsbox marker on t.py::test_x"),
        (
            (),
            {"network": "veth"},
            "invalid network 'veth' from nsbox marker on t.py::test_x (expected one of 'none', 'host', 'private' or "
            "pytest_nsbox.Network(...))",
        ),
        (
            (),
            {"memroy": 1},
            "nsbox marker on t.py::test_x: nsbox() got an unexpected keyword argument 'memroy' (did you mean 'memory'?); "
            "valid keywords: image, memory, pids, cpus, timeout, network",
        ),
        ((), {"bogus": 1}, "nsbox marker on t.py::test_x: nsbox() got an unexpected keyword argument 'bogus'; valid keywords: "),
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


NO_INI = {
    "nsbox_image": "",
    "nsbox_memory": "",
    "nsbox_pids": "",
    "nsbox_cpus": "",
    "nsbox_timeout": "",
    "nsbox_disk": "",
    "nsbox_scratch": "",
}


def test_precedence_marker_over_command_line_over_ini() -> None:
    ini = {**NO_INI, "nsbox_memory": "64M", "nsbox_cpus": "0.5", "nsbox_timeout": "5", "nsbox_image": "ini-image"}
    options = {"--nsbox-memory": "128M", "--nsbox-timeout": "7", "--nsbox-pids": None, "--nsbox-image": "cli-image"}
    defaults = defaults_from(ini.__getitem__, options)
    assert defaults.spec == SandboxSpec(image="cli-image", memory=128 * 2**20, cpus=0.5, timeout=7.0)
    assert defaults.sources == {"image": "command line", "memory": "command line", "cpus": "ini", "timeout": "command line"}
    spec = spec_from_marker((), {"memory": "1G"}, "t.py::test_x", defaults)
    assert (spec.memory, spec.timeout, spec.image) == (2**30, 7.0, "cli-image")


def test_command_line_zero_turns_an_ini_limit_off() -> None:
    ini = {**NO_INI, "nsbox_memory": "64M", "nsbox_timeout": "5", "nsbox_pids": "50"}
    defaults = defaults_from(ini.__getitem__, {"--nsbox-memory": "0", "--nsbox-timeout": "none", "--nsbox-pids": "off"})
    assert defaults.spec == SandboxSpec()


def test_bad_option_value_names_the_option() -> None:
    with pytest.raises(SpecError, match=r"invalid cpus 'lots' from option --nsbox-cpus \(expected a positive number"):
        defaults_from(NO_INI.__getitem__, {"--nsbox-cpus": "lots"})


@pytest.mark.parametrize("off", [None, 0])
def test_marker_none_or_zero_turns_a_default_off(off: object) -> None:
    ini = {**NO_INI, "nsbox_memory": "64M", "nsbox_pids": "50", "nsbox_cpus": "1", "nsbox_timeout": "5"}
    defaults = defaults_from(ini.__getitem__)
    spec = spec_from_marker((), {"memory": off, "pids": off, "cpus": off, "timeout": off}, "t.py::test_x", defaults)
    assert spec.requested_limits() == {}  # pids: back to the safety cap, which the cgroup applies
    assert spec_from_marker((), {"memory": off}, "t.py::test_x", defaults).requested_limits() == {
        "pids": 50,
        "cpus": 1.0,
        "timeout": 5.0,
    }


def test_marker_none_keeps_image_and_network_defaults() -> None:
    defaults = defaults_from({**NO_INI, "nsbox_image": "tiny"}.__getitem__)
    assert spec_from_marker((None,), {"network": None}, "t.py::test_x", defaults) == SandboxSpec(image="tiny")


def test_decorator_passes_none_through() -> None:
    assert nsbox(memory=None).mark.kwargs == {"memory": None}
    assert nsbox().mark.kwargs == {}


def test_stacked_markers_closest_wins_per_keyword() -> None:
    marks = [Mark((), {"memory": "64M"}, level=0), Mark(("busybox",), {"memory": "1G", "timeout": 3}, level=1)]
    spec = spec_from_markers(marks, "t.py::C::test_x", Defaults())
    assert (spec.image, spec.memory, spec.timeout) == ("busybox", 64 * 2**20, 3.0)


def test_stacked_markers_on_one_level_must_agree() -> None:
    agreeing = [Mark((), {"memory": "64M", "pids": 10}), Mark((), {"memory": "64M"})]
    assert spec_from_markers(agreeing, "t.py::test_x", Defaults()).pids == 10
    clashing = [Mark((), {"memory": "64M"}), Mark((), {"memory": "1G"})]
    with pytest.raises(SpecError, match=r"t.py::test_x: stacked nsbox markers on one level give memory two values"):
        spec_from_markers(clashing, "t.py::test_x", Defaults())


def test_every_stacked_marker_is_validated() -> None:
    with pytest.raises(SpecError, match=r"invalid timeout 'soon' from nsbox marker on t.py::C::test_x"):
        spec_from_markers([Mark((), {"memory": "64M"}), Mark((), {"timeout": "soon"}, level=1)], "t.py::C::test_x", Defaults())


def test_describe_defaults_names_value_and_source() -> None:
    assert describe_defaults(Defaults()) == f"image=host, pids={DEFAULT_PIDS} (built-in)"
    defaults = defaults_from({**NO_INI, "nsbox_memory": "256M"}.__getitem__, {"--nsbox-timeout": "60", "--nsbox-cpus": "0.5"})
    assert describe_defaults(defaults) == (
        f"image=host, memory=256 MiB (ini), pids={DEFAULT_PIDS} (built-in), cpus=0.5 (command line), timeout=60s (command line)"
    )


@pytest.mark.parametrize(
    ("cost", "floor"), [(5 * 2**20, 10 * 2**20), (int(4.8 * 2**20), 10 * 2**20), (2**20 + 1, 3 * 2**20), (None, 16 * 2**20)]
)
def test_start_memory_floor_is_twice_an_empty_sandbox_in_whole_mib(cost: int | None, floor: int) -> None:
    from pytest_nsbox.runtest import start_memory_floor

    assert start_memory_floor(cost) == floor


def test_disk_takes_a_size_of_at_least_one_mib() -> None:
    assert spec_from_marker((), {"disk": "64M"}, "t", Defaults()).disk == 64 * 2**20
    with pytest.raises(SpecError, match=r"invalid disk '512K' from nsbox marker on t \(at least 1M"):
        spec_from_marker((), {"disk": "512K"}, "t", Defaults())


def test_marker_disk_none_falls_back_to_the_built_in_bound_not_to_none() -> None:
    ini = {**NO_INI, "nsbox_disk": "2G"}
    defaults = defaults_from(ini.__getitem__, {"--nsbox-disk": "1G"})
    assert defaults.spec.disk == 2**30 and defaults.sources["disk"] == "command line"
    assert spec_from_marker((), {"disk": None}, "t", defaults).disk is None  # P fills in the built-in bound
    assert "disk=1 GiB (command line)" in describe_defaults(defaults, 5 * 2**30)
    assert "disk=5 GiB (built-in)" in describe_defaults(Defaults(), 5 * 2**30)


# --- expect_limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("memory", ("memory",)),
        ("pids", ("pids",)),
        (("pids", "memory"), ("memory", "pids")),  # one order, whatever the marker's
        (("disk", "pids", "memory"), ("memory", "pids", "disk")),
        (["memory"], ("memory",)),
        ({"pids"}, ("pids",)),
        ((), ()),
        (None, ()),
    ],
)
def test_expect_limits_names_limits_the_test_sets(value: object, expected: tuple[str, ...]) -> None:
    spec = spec_from_marker((), {"memory": "64M", "pids": 32, "disk": "8M", "expect_limits": value}, "t.py::test_x", Defaults())
    assert spec.expect_limits == expected


def test_expect_limits_defaults_to_nothing() -> None:
    assert spec_from_marker((), {"memory": "64M"}, "t.py::test_x", Defaults()).expect_limits == ()


def test_expect_limits_may_name_a_limit_from_the_defaults() -> None:
    defaults = defaults_from({**NO_INI, "nsbox_pids": "50"}.__getitem__, {"--nsbox-memory": "64M"})
    spec = spec_from_marker((), {"expect_limits": ("memory", "pids")}, "t.py::test_x", defaults)
    assert (spec.memory, spec.pids, spec.expect_limits) == (64 * 2**20, 50, ("memory", "pids"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"memory": "64M", "expect_limits": "memroy"},
            "invalid expect_limits 'memroy' from nsbox marker on t.py::test_x ('memroy' is not a limit a test may expect; "
            "did you mean 'memory'? expected 'memory', 'pids', 'disk', or a tuple of them)",
        ),
        (
            {"memory": "64M", "expect_limits": ("memory", "swap")},
            "invalid expect_limits ('memory', 'swap') from nsbox marker on t.py::test_x ('swap' is not a limit a test may "
            "expect; expected 'memory', 'pids', 'disk', or a tuple of them)",
        ),
        (
            {"timeout": 5, "expect_limits": "timeout"},
            "invalid expect_limits 'timeout' from nsbox marker on t.py::test_x (timeout is not a limit a test may expect: "
            "a test that wants something to run out of time uses its own timer",
        ),
        ({"cpus": 0.5, "expect_limits": ["cpus"]}, "invalid expect_limits ['cpus'] from nsbox marker on t.py::test_x (cpus is"),
        (
            {"memory": "64M", "expect_limits": 1},
            "invalid expect_limits 1 from nsbox marker on t.py::test_x (expected 'memory', 'pids', 'disk', or a tuple of them)",
        ),
        ({"memory": "64M", "expect_limits": ""}, "invalid expect_limits '' from nsbox marker on t.py::test_x"),
        ({"memory": "64M", "expect_limits": ("memory", 2)}, "invalid expect_limits ('memory', 2) from nsbox marker"),
        (
            {"expect_limits": "memory"},
            "nsbox marker on t.py::test_x: expect_limits names memory, but the test has no memory limit; "
            "give memory=... in the marker (or --nsbox-memory, ini nsbox_memory), or drop 'memory' from expect_limits",
        ),
        (
            {"memory": "64M", "expect_limits": "pids"},
            "nsbox marker on t.py::test_x: expect_limits names pids, but the test has no pids limit (the safety cap of "
            f"{DEFAULT_PIDS} is not a limit a test may expect); give pids=... in the marker",
        ),
        ({"memory": None, "expect_limits": "memory"}, "nsbox marker on t.py::test_x: expect_limits names memory, but"),
        (
            {"expect_limits": "disk"},
            "nsbox marker on t.py::test_x: expect_limits names disk, but the test has no disk limit (the built-in disk "
            "bound is not a limit a test may expect); give disk=... in the marker",
        ),
        (
            {"memory": "64M", "expect_lmits": "memory"},
            "nsbox marker on t.py::test_x: nsbox() got an unexpected keyword argument 'expect_lmits' "
            "(did you mean 'expect_limits'?); valid keywords: image, memory, pids, cpus, timeout, network, disk, expect_limits",
        ),
    ],
)
def test_bad_expect_limits_are_marker_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as exc:
        spec_from_marker((), kwargs, "t.py::test_x", Defaults())
    assert str(exc.value).startswith(message), str(exc.value)


def test_expect_limits_of_a_limit_turned_off_by_the_marker_is_an_error() -> None:
    defaults = defaults_from({**NO_INI, "nsbox_memory": "64M"}.__getitem__)
    assert spec_from_marker((), {"expect_limits": "memory"}, "t.py::test_x", defaults).expect_limits == ("memory",)
    with pytest.raises(SpecError, match=r"expect_limits names memory, but the test has no memory limit"):
        spec_from_marker((), {"memory": 0, "expect_limits": "memory"}, "t.py::test_x", defaults)


def test_stacked_expect_limits_closest_wins_and_none_expects_nothing() -> None:
    module = Mark((), {"memory": "64M", "pids": 32, "expect_limits": ("memory", "pids")}, level=2)
    spec = spec_from_markers([Mark((), {"expect_limits": "pids"}, level=0), module], "t.py::C::test_x", Defaults())
    assert spec.expect_limits == ("pids",)
    assert spec_from_markers([Mark((), {"expect_limits": None}), module], "t.py::C::test_x", Defaults()).expect_limits == ()
    assert spec_from_markers([module], "t.py::C::test_x", Defaults()).expect_limits == ("memory", "pids")
    clashing = [Mark((), {"memory": "64M", "expect_limits": "memory"}), Mark((), {"expect_limits": ()})]
    with pytest.raises(SpecError, match=r"stacked nsbox markers on one level give expect_limits two values"):
        spec_from_markers(clashing, "t.py::test_x", Defaults())


def test_an_inner_marker_that_drops_the_expected_limit_is_an_error() -> None:
    """The module expects memory; the test turns memory off: nothing left to expect."""
    module = Mark((), {"memory": "64M", "expect_limits": "memory"}, level=1)
    with pytest.raises(SpecError, match=r"t.py::test_x: expect_limits names memory, but the test has no memory limit"):
        spec_from_markers([Mark((), {"memory": None}), module], "t.py::test_x", Defaults())


def test_decorator_takes_expect_limits() -> None:
    assert nsbox(memory="64M", expect_limits="memory").mark.kwargs == {"memory": "64M", "expect_limits": "memory"}
    assert nsbox(pids=8, expect_limits=("pids",)).mark.kwargs == {"pids": 8, "expect_limits": ("pids",)}
    assert nsbox(expect_limits=None).mark.kwargs == {"expect_limits": None}


def test_marker_help_lists_expect_limits() -> None:
    from pytest_nsbox.plugin import MARKER_HELP

    assert "expect_limits=()" in MARKER_HELP


# --- drop_env --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("*_TOKEN", ("*_TOKEN",)),
        (["*_TOKEN", "AWS_*", "*_TOKEN"], ("*_TOKEN", "AWS_*")),
        (("GH_[A-Z]*",), ("GH_[A-Z]*",)),
        ([], None),
    ],
)
def test_parse_drop_env(value: object, expected: tuple[str, ...] | None) -> None:
    assert parse_drop_env(value) == expected


@pytest.mark.parametrize("value", [5, b"X", ["A", 1], ["A=B"], [""], [" X"], {"X"}])
def test_parse_drop_env_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"expected a pattern or a list|cannot name a variable"):
        parse_drop_env(value)


def test_drop_env_marker_over_ini_and_none_drops_nothing() -> None:
    defaults = with_drop_env(Defaults(), ["*_TOKEN", "AWS_*"])
    assert defaults.spec.drop_env == ("*_TOKEN", "AWS_*") and defaults.sources == {"drop_env": "ini"}
    assert "drop_env=*_TOKEN AWS_* (ini)" in describe_defaults(defaults)
    assert spec_from_marker((), {}, "t.py::test_x", defaults).drop_env == ("*_TOKEN", "AWS_*")
    assert spec_from_marker((), {"drop_env": "SECRET"}, "t.py::test_x", defaults).drop_env == ("SECRET",)
    assert spec_from_marker((), {"drop_env": None}, "t.py::test_x", defaults).drop_env is None
    assert spec_from_marker((), {"drop_env": []}, "t.py::test_x", defaults).drop_env is None
    assert with_drop_env(Defaults(), []) == Defaults() and "drop_env" not in describe_defaults(Defaults())
    assert nsbox(drop_env=["X_*"]).mark.kwargs == {"drop_env": ["X_*"]}


def test_bad_drop_env_names_its_source() -> None:
    with pytest.raises(SpecError, match=r"invalid drop_env \['A', 'B=1'\] from ini nsbox_drop_env \('B=1' cannot name"):
        with_drop_env(Defaults(), ["A", "B=1"])
    with pytest.raises(SpecError, match=r"invalid drop_env 3 from nsbox marker on t.py::test_x \(expected a pattern"):
        spec_from_marker((), {"drop_env": 3}, "t.py::test_x", Defaults())


def test_scratch_is_memory_or_disk_by_marker_option_or_ini() -> None:
    assert spec_from_marker((), {}, "t.py::test_x", Defaults()).scratch == "memory"
    assert spec_from_marker((), {"scratch": "disk"}, "t.py::test_x", Defaults()).scratch == "disk"
    with pytest.raises(SpecError, match=r"invalid scratch 'ssd' from nsbox marker on t.py::test_x \(expected 'memory'"):
        spec_from_marker((), {"scratch": "ssd"}, "t.py::test_x", Defaults())
    ini = defaults_from({**NO_INI, "nsbox_scratch": "disk"}.__getitem__)
    assert ini.spec.scratch == "disk" and describe_defaults(ini).endswith(", scratch=disk (ini)")
    assert spec_from_marker((), {"scratch": None}, "t.py::test_x", ini).scratch == "disk"  # None: not given
    assert spec_from_marker((), {"scratch": "memory"}, "t.py::test_x", ini).scratch == "memory"
    assert defaults_from(NO_INI.__getitem__, {"--nsbox-scratch": "memory"}).spec.scratch == "memory"
    with pytest.raises(SpecError, match="invalid scratch 'off' from option --nsbox-scratch"):
        defaults_from(NO_INI.__getitem__, {"--nsbox-scratch": "off"})
    assert nsbox(scratch="disk").kwargs == {"scratch": "disk"}
