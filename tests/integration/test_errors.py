"""Bad input and unavailable sandboxes: clear errors naming the test and the value; bodies never run."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_nsbox import reports

BODY_RAN = "BODY-RAN-OUTSIDE"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('memory="lots"', "invalid memory 'lots' from nsbox marker on test_inner.py::test_bad"),
        ("memory=-1", "invalid memory -1 from nsbox marker on test_inner.py::test_bad"),  # 0: no limit
        ("pids=-1", "invalid pids -1 from nsbox marker on test_inner.py::test_bad"),
        ('timeout="soon"', "invalid timeout 'soon' from nsbox marker on test_inner.py::test_bad"),
        ("cpus=-0.5", "invalid cpus -0.5 from nsbox marker on test_inner.py::test_bad"),  # 0: no limit
        ('network="bridge"', "invalid network 'bridge' from nsbox marker on test_inner.py::test_bad"),
        (
            "memroy=1",
            "nsbox marker on test_inner.py::test_bad: nsbox() got an unexpected keyword argument 'memroy' "
            "(did you mean 'memory'?); valid keywords: image, memory, pids, cpus, timeout, network",
        ),
        (
            'memory="64M", expect_limits="memroy"',
            "invalid expect_limits 'memroy' from nsbox marker on test_inner.py::test_bad ('memroy' is not a limit a test "
            "may expect; did you mean 'memory'? expected 'memory', 'pids', 'disk', or a tuple of them)",
        ),
        (
            'timeout=5, expect_limits=("timeout",)',
            "invalid expect_limits ('timeout',) from nsbox marker on test_inner.py::test_bad (timeout is not a limit a "
            "test may expect: a test that wants something to run out of time uses its own timer",
        ),
        (
            'expect_limits="memory"',
            "nsbox marker on test_inner.py::test_bad: expect_limits names memory, but the test has no memory limit; "
            "give memory=... in the marker (or --nsbox-memory, ini nsbox_memory), or drop 'memory' from expect_limits",
        ),
        ('image=""', "invalid image '' from nsbox marker on test_inner.py::test_bad"),
        ('image="no-such-image"', "unknown image 'no-such-image'"),
        ('image="oci:whatever"', "whatever does not exist"),
    ],
)
def test_bad_marker_arguments_are_errors(run_inner, arguments: str, expected: str) -> None:
    result = run_inner(
        f"""
        import pytest

        @pytest.mark.nsbox({arguments})
        def test_bad():
            print({BODY_RAN!r})
        """
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*{expected}*"])
    result.stdout.no_fnmatch_line(f"*{BODY_RAN}*")


@pytest.mark.parametrize("arguments", ['memory="256M"', "pids=64", "cpus=0.5"])
def test_unenforceable_limits_are_never_dropped(run_inner, arguments: str) -> None:
    """A cgroup root that cannot be created: SKIPPED with the reason, ERROR under --nsbox-require."""
    source = f"""
        import pytest

        @pytest.mark.nsbox({arguments})
        def test_limited():
            print({BODY_RAN!r})
        """
    args = ("-o", "nsbox_cgroup_root=no-such-parent/pytest-nsbox")
    result = run_inner(source, *args)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*cannot enforce the requested limits*"])
    result.stdout.no_fnmatch_line(f"*{BODY_RAN}*")
    result = run_inner(source, *args, "--nsbox-require")
    result.assert_outcomes(errors=1)
    result.stdout.no_fnmatch_line(f"*{BODY_RAN}*")
    assert list(Path("/sys/fs/cgroup").glob("*/no-such-parent")) == []  # nothing made on the way


def test_bad_ini_value_is_a_usage_error(run_inner, pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nnsbox_memory = plenty\n")
    result = run_inner("def test_x(): pass")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid memory 'plenty' from ini nsbox_memory*"])


@pytest.mark.needs_userns
def test_sandbox_that_cannot_be_built_is_skipped_with_step_and_hint(run_inner, pytester: pytest.Pytester) -> None:
    source = f"""
        import pytest

        @pytest.mark.nsbox(image="/proc/sys")      # procfs cannot be an overlay lower layer
        def test_unbuildable():
            print({BODY_RAN!r})
        """
    result = run_inner(source)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*could not build the sandbox: step mount_overlay failed*(EINVAL)*Hint:*"])
    result.stdout.no_fnmatch_line(f"*{BODY_RAN}*")

    required = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "--nsbox-require")
    required.assert_outcomes(errors=1)
    required.stdout.fnmatch_lines([f"*{reports.REQUIRE_NOTE.strip()}*"])


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(
        ["@pytest.mark.nsbox(image='host', *, memory=None, *network='none', disk=None, expect_limits=()*"]
    )


def test_a_spec_hook_that_drops_an_expected_limit_is_an_error(run_inner) -> None:
    """pytest_nsbox_modify_spec may not leave expect_limits naming a limit the spec no longer sets."""
    result = run_inner(
        f"""
        import pytest

        @pytest.mark.nsbox(memory="64M", expect_limits="memory")
        def test_limited():
            print({BODY_RAN!r})
        """,
        conftest="""
        import dataclasses

        def pytest_nsbox_modify_spec(item, spec):
            return dataclasses.replace(spec, memory=None)
        """,
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*spec of test_inner.py::test_limited from pytest_nsbox_modify_spec: expect_limits names memory, but the test*"]
    )
    result.stdout.no_fnmatch_line(f"*{BODY_RAN}*")


def test_plugin_can_be_disabled(run_inner) -> None:
    result = run_inner(
        """
        import socket, pytest

        @pytest.mark.nsbox
        def test_unsandboxed():
            assert socket.gethostname() != "nsbox"
        """,
        "-p",
        "no:nsbox",
    )
    result.assert_outcomes(passed=1)


@pytest.mark.needs_userns
@pytest.mark.needs_overlay_userns
def test_a_test_process_outside_its_sandbox_refuses_to_run(run_inner, tmp_path) -> None:
    """Fail closed: a bug that leaves the test process outside the sandbox's namespaces (here the
    joining steps are dropped) is an ERROR "refusing to run the test", and the body never runs."""
    canary = tmp_path / "canary"
    result = run_inner(
        f"""
        import pytest

        @pytest.mark.nsbox
        def test_outside():
            open({str(canary)!r}, "w").write({BODY_RAN!r})
        """,
        conftest="""
        from pytest_nsbox.box import prebuilt

        prebuilt._join_steps = lambda config, kept, sandbox, flags: []  # the bug: never enter the sandbox
        """,
    )
    result.assert_outcomes(errors=1)
    refusal = reports.NOT_INSIDE.format(message="*not inside a sandbox: mnt namespace is the host's*")
    result.stdout.fnmatch_lines([f"*{refusal}*"])
    result.stdout.fnmatch_lines(["*the root filesystem (device *) is not the sandbox's (device *)*"])
    assert not canary.exists()
