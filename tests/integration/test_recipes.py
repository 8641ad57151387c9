"""Image recipes: a base plus steps, each step a cached layer; Debian and busybox bases."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]

DEMO = """
[base]
busybox = true

[[steps]]
env = { GREETING = "built" }

[[steps]]
run = "echo $GREETING > /etc/motd && rm /bin/ls"

[[steps]]
copy = { from = "files/greeting", to = "/etc/greeting" }
"""

CHECK_DEMO = """
import os, pytest

@pytest.mark.nsbox(image="demo")
def test_demo():
    assert open("/etc/motd").read() == "built\\n"             # run step
    assert not os.path.exists("/bin/ls")                       # a deletion in a run step: a whiteout
    assert os.path.islink("/bin/cat")                          # busybox applets
    assert open("/etc/greeting").read() == "COPIED"            # copy step
"""


@pytest.fixture
def project(pytester: pytest.Pytester, tmp_path: Path) -> Path:
    recipe = pytester.path / "rootfs_images" / "demo"
    (recipe / "files").mkdir(parents=True)
    (recipe / "image.toml").write_text(DEMO)
    (recipe / "files" / "greeting").write_text("COPIED")
    pytester.makeini(f"[pytest]\nnsbox_cache_dir = {tmp_path / 'cache'}\n")
    return recipe


@pytest.mark.skipif(not shutil.which("busybox") and not Path("/bin/busybox").exists(), reason="needs busybox-static")
def test_recipe_steps_are_layers_built_once_and_from_the_changed_step_on(run_inner, project: Path) -> None:
    first = run_inner(CHECK_DEMO)
    first.assert_outcomes(passed=1)
    built = [line for line in first.stderr.lines if "building image demo" in line and "done" not in line]
    assert [_step(line) for line in built] == ["step 1/4", "step 3/4", "step 4/4"]
    second = run_inner(CHECK_DEMO)
    second.assert_outcomes(passed=1)
    assert "building image demo" not in second.stderr.str()
    (project / "files" / "greeting").write_text("COPIED")  # unchanged content: still cached
    (project / "image.toml").write_text(DEMO.replace("/etc/greeting", "/etc/greeting2"))
    third = run_inner(CHECK_DEMO.replace("/etc/greeting", "/etc/greeting2"))
    third.assert_outcomes(passed=1)
    rebuilt = [line for line in third.stderr.lines if "building image demo" in line and "done" not in line]
    assert [_step(line) for line in rebuilt] == ["step 4/4"]


def _step(line: str) -> str:
    return line.split(": ")[2]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[base]\nbusybox = true\ndebian = 'bookworm'\n", "field 'base' must have exactly one of"),
        ("[base]\nscratch = true\n[[steps]]\nrun = ''\n", "steps[[]1].run must be a non-empty string"),
        ("[base]\nscratch = true\n[[steps]]\ncopy = { from = '../../etc/passwd', to = '/x' }\n", "steps[[]1].copy.from"),
        ("[base]\nscratch = true\n[[steps]]\nenv = { 'A=B' = 'x' }\n", "steps[[]1].env must be a table of strings (keys*"),
        ("[base]\nbusybox = true\n[[steps]]\nrun = 'exit 3'\n", "run 'exit 3' failed (3)"),
        ("[base]\nscratch = true\n[[steps]]\nrun = 'true'\n", "No such file or directory: '/bin/sh'"),
        ("[base]\nrecipe = 'demo'\n", "base recipe cycle demo -> demo"),
        ("base = [", "image.toml"),
    ],
)
def test_bad_recipes_name_the_file_and_the_field(run_inner, project: Path, toml: str, message: str) -> None:
    (project / "image.toml").write_text(toml)
    result = run_inner(CHECK_DEMO)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*image 'demo'*{message}*"])


def test_unknown_image_lists_the_known_ones(run_inner, project: Path) -> None:
    result = run_inner(CHECK_DEMO.replace('image="demo"', 'image="demo2"'))
    result.assert_outcomes(errors=1)
    # the project's own first, then the shipped ones
    result.stdout.fnmatch_lines(["*unknown image 'demo2'*known images: 'host', 'demo', 'busybox', 'debian-bookworm'*"])


CHECK_BUSYBOX = """
import os, pytest

@pytest.mark.nsbox(image="busybox")
def test_busybox():
    assert os.path.islink("/bin/cat")                          # busybox applets
    assert not os.path.exists("/usr/bin/apt-get")              # not the host's /
    assert os.path.exists("/etc/own-busybox") == {own}
"""

OWN_BUSYBOX = """
[base]
busybox = true

[[steps]]
run = "touch /etc/own-busybox"
"""


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox-static")
def test_shipped_recipes_by_name_and_a_projects_own_of_the_same_name_wins(
    run_inner, pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pytester.makeini(f"[pytest]\nnsbox_cache_dir = {tmp_path / 'cache'}\n")
    assert not (pytester.path / "rootfs_images").exists()
    run_inner(CHECK_BUSYBOX.format(own=False)).assert_outcomes(passed=1)
    own = pytester.path / "rootfs_images" / "busybox"
    own.mkdir(parents=True)
    (own / "image.toml").write_text(OWN_BUSYBOX)
    result = run_inner(CHECK_BUSYBOX.format(own=True))
    result.assert_outcomes(passed=1)
    assert "building image busybox: step 2/2" in result.stderr.str()
