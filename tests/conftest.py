"""Shared test setup: capability markers computed by the same probes the plugin uses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_nsbox import probe

pytest_plugins = ["pytester"]

TESTS_DIR = Path(__file__).resolve().parent
TINY_IMAGE = TESTS_DIR / "images" / "tiny"

REQUIRE_KEY = {
    "needs_userns": "userns",
    "needs_overlay_userns": "userns",
    "needs_cgroup_limits": "cgroup",
    "needs_subuid": "subuid",
    "needs_private_network": "network",
    "needs_netem": "netem",
}
CAPABILITIES = {
    "needs_userns": lambda: probe.userns(),
    "needs_overlay_userns": lambda: probe.overlay_userns(),
    "needs_cgroup_limits": lambda: probe.cgroup_limits(),
    "needs_subuid": lambda: probe.subordinate_ids(),
    "needs_private_network": lambda: next(
        (p for p in map(probe.network_link, ("veth", "bridge")) if not p.ok), probe.network_link("bridge")
    ),
    "needs_netem": lambda: probe.netem(),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    required = {c.strip() for c in os.environ.get("PYTEST_NSBOX_REQUIRE", "").split(",") if c.strip()}
    for item in items:
        for name, check in CAPABILITIES.items():
            if item.get_closest_marker(name):
                result = check()
                if not result.ok:
                    if REQUIRE_KEY[name] in required:  # CI: a missing capability fails the run (bwrap)
                        raise pytest.UsageError(f"{item.nodeid}: {result.describe()} (PYTEST_NSBOX_REQUIRE is set)")
                    item.add_marker(pytest.mark.skip(reason=result.describe()))
        if item.get_closest_marker("needs_root") and os.getuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root"))
        if item.get_closest_marker("needs_nonroot") and os.getuid() == 0:
            item.add_marker(pytest.mark.skip(reason="needs an unprivileged user"))


@pytest.fixture
def tiny_image() -> Path:
    return TINY_IMAGE


BUILD_MODES = {"prebuilt": (), "forked": ("-o", "nsbox_prebuild=false")}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("both_build_modes") and "run_inner" in metafunc.fixturenames:
        metafunc.parametrize("build_mode", list(BUILD_MODES))


@pytest.fixture
def build_mode() -> str:
    """How the inner pytest builds sandboxes: "prebuilt" (the default) or "forked" (nsbox_prebuild=false)."""
    return "prebuilt"


@pytest.fixture
def run_inner(pytester: pytest.Pytester, build_mode: str, monkeypatch: pytest.MonkeyPatch):
    """Run pytest in a subprocess (it forks and unshares) on the given test source; the inner
    pytest (and its sandboxes) can import ``helpers``."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))

    def run(source: str, *args: str, conftest: str | None = None, timeout: float = 300) -> pytest.RunResult:
        pytester.makepyfile(test_inner=source)
        if conftest is not None:
            pytester.makeconftest(conftest)
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *BUILD_MODES[build_mode], *args, timeout=timeout)

    return run
