"""Images imported from OCI layouts, oci-archives and docker-save archives; hostile layers refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from oci_writer import (
    Entry,
    host_shell_entries,
    layer_tar,
    tree_snapshot,
    write_docker_archive,
    write_layout,
    write_oci_archive,
)

from pytest_nsbox import probe

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]

BASE = [
    Entry("etc", "dir", mode=0o755),
    Entry("etc/os-release", content=b"ID=ocitest\n"),
    Entry("usr/share/x", "dir", mode=0o755),
    Entry("usr/share/x/gone.txt", content=b"deleted above\n"),
    Entry("usr/share/x/kept.txt", content=b"kept\n"),
    Entry("usr/bin/tool", content=b"#!/bin/sh\n", mode=0o4755),
    Entry("usr/bin/link", "symlink", target="tool"),
    Entry("usr/bin/hard", "hardlink", target="usr/bin/tool"),
    Entry("usr/share/attr.txt", content=b"x", xattrs={"user.nsbox": "tagged"}),
    Entry("opaque", "dir", mode=0o755),
    Entry("opaque/old1", content=b"1"),
    Entry("opaque/old2", content=b"2"),
    Entry("readonly", "dir", mode=0o555),
    Entry("readonly/inside", content=b"in a read-only dir"),
    Entry("dev/sda", "chardev"),
]
TOP = [
    Entry("usr/share/x/gone.txt", "whiteout"),
    Entry("opaque", "opaque"),
    Entry("opaque/new", content=b"new"),
]

CHECKS = """
import os, pytest

@pytest.mark.nsbox(image=IMAGE)
def test_layers():
    assert open("/etc/os-release").read() == "ID=ocitest\\n"
    assert not os.path.exists("/usr/share/x/gone.txt")            # whiteout in the upper layer
    assert open("/usr/share/x/kept.txt").read() == "kept\\n"
    assert sorted(os.listdir("/opaque")) == ["new"]                # opaque directory
    assert os.stat("/usr/bin/tool").st_mode & 0o7777 == 0o4755     # setuid kept
    assert os.readlink("/usr/bin/link") == "tool"
    assert os.stat("/usr/bin/hard").st_ino == os.stat("/usr/bin/tool").st_ino
    assert os.getxattr("/usr/share/attr.txt", "user.nsbox") == b"tagged"
    assert os.stat("/readonly").st_mode & 0o777 == 0o555
    assert open("/readonly/inside").read() == "in a read-only dir"
    assert os.listdir("/dev") and "sda" not in os.listdir("/dev")  # the image's device nodes never appear
    os.remove("/usr/share/x/kept.txt")                             # writable layer on top
"""


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _run(run_inner, image: str, cache: Path, *args: str) -> pytest.RunResult:
    return run_inner(CHECKS.replace("IMAGE", repr(image)), "-o", f"nsbox_cache_dir={cache}", *args)


@pytest.mark.parametrize("kind", ["oci", "oci-archive", "docker-archive"])
def test_layers_whiteouts_and_metadata(run_inner, tmp_path: Path, cache: Path, kind: str) -> None:
    layers = [layer_tar(BASE, "gzip"), layer_tar(TOP)]
    if kind == "oci":
        write_layout(tmp_path / "layout", layers, tag="v1")
        image = f"oci:{tmp_path / 'layout'}:v1"
    elif kind == "oci-archive":
        write_oci_archive(tmp_path / "image.tar", layers, tag="v1")
        image = f"oci-archive:{tmp_path / 'image.tar'}:v1"
    else:
        write_docker_archive(tmp_path / "image.tar", layers)
        image = f"docker-archive:{tmp_path / 'image.tar'}"
    result = _run(run_inner, image, cache)
    result.assert_outcomes(passed=1)
    layer_dirs = list((cache / "layers" / "sha256").iterdir())
    assert len([d for d in layer_dirs if d.is_dir()]) == 2
    assert not [d for d in layer_dirs if d.name.startswith(".tmp-")]
    result = _run(run_inner, image, cache)  # cached: the same two layers, still intact
    result.assert_outcomes(passed=1)


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd command")
def test_zstd_layers(run_inner, tmp_path: Path, cache: Path) -> None:
    write_layout(tmp_path / "layout", [layer_tar(BASE, "zstd"), layer_tar(TOP, "zstd")])
    _run(run_inner, f"oci:{tmp_path / 'layout'}", cache).assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([Entry("../escape", content=b"x")], "'..' in the path"),
        ([Entry("/abs-escape", content=b"x")], "absolute path"),
        ([Entry("ln", "symlink", target="OUTSIDE"), Entry("ln/pwned", content=b"x")], "which is not a directory"),
        ([Entry("hl", "hardlink", target="../../../OUTSIDE/victim")], "'..' in the path"),
        ([Entry("ok", "dir"), Entry("ok/.wh..", "file")], "malformed whiteout"),
    ],
)
def test_hostile_layers_are_refused_and_leave_nothing(
    run_inner, tmp_path: Path, cache: Path, entries: list[Entry], reason: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    for entry in entries:
        entry.target = entry.target.replace("OUTSIDE", str(outside))
    digests = write_layout(tmp_path / "layout", [layer_tar(entries)])
    result = _run(run_inner, f"oci:{tmp_path / 'layout'}", cache)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*image 'oci:*layout': layer {digests['0']} cannot be imported: refused: member*{reason}*"])
    assert tree_snapshot(outside) == ["victim"] and (outside / "victim").read_text() == "untouched"
    assert [p for p in tree_snapshot(cache) if not p.endswith(".lock")] == ["layers", "layers/sha256"]


def test_symlink_in_a_lower_layer_cannot_redirect_an_upper_one(run_inner, tmp_path: Path, cache: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    lower = layer_tar([Entry("ln", "symlink", target=str(outside))])
    upper = layer_tar([Entry("ln/pwned", content=b"x")])
    write_layout(tmp_path / "layout", [lower, upper])
    result = run_inner(
        f"""
        import os, pytest

        @pytest.mark.nsbox(image={f"oci:{tmp_path / 'layout'}"!r})
        def test_upper_dir_wins():
            assert os.path.isdir("/ln") and not os.path.islink("/ln")
        """,
        "-o",
        f"nsbox_cache_dir={cache}",
    )
    result.assert_outcomes(passed=1)
    assert tree_snapshot(outside) == []


def test_corrupt_blob_is_named(run_inner, tmp_path: Path, cache: Path) -> None:
    digests = write_layout(tmp_path / "layout", [layer_tar(BASE, "gzip")])
    blob = tmp_path / "layout" / "blobs" / "sha256" / digests["0"].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    result = _run(run_inner, f"oci:{tmp_path / 'layout'}", cache)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*layer {digests['0']} cannot be imported*blob is corrupt*"])


def test_unknown_tag_and_missing_layout(run_inner, tmp_path: Path, cache: Path) -> None:
    write_layout(tmp_path / "layout", [layer_tar(BASE)], tag="v1")
    result = _run(run_inner, f"oci:{tmp_path / 'layout'}:v2", cache)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no manifest tagged 'v2'*"])
    result = _run(run_inner, f"oci:{tmp_path / 'nowhere'}", cache)
    result.stdout.fnmatch_lines(["*nowhere does not exist*"])


def test_cache_is_built_once_under_concurrency(run_inner, pytester: pytest.Pytester, tmp_path: Path, cache: Path) -> None:
    """xdist -n 4 and a second pytest at the same time share one cold cache: every test passes."""
    import subprocess
    import sys

    write_layout(tmp_path / "layout", [layer_tar(BASE, "gzip"), layer_tar(TOP)])
    image = f"oci:{tmp_path / 'layout'}"
    source = CHECKS.replace("IMAGE", repr(image)).replace(
        "def test_layers():", "@pytest.mark.parametrize('n', range(8))\ndef test_layers(n):"
    )
    pytester.makepyfile(test_inner=source)
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", f"nsbox_cache_dir={cache}"]
    second = subprocess.Popen([*args, "test_inner.py"], cwd=pytester.path, stdout=subprocess.PIPE, text=True)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", f"nsbox_cache_dir={cache}", "-n", "4")
    out, _ = second.communicate(timeout=300)
    result.assert_outcomes(passed=8)
    assert second.returncode == 0 and "8 passed" in out
    assert len([d for d in (cache / "layers" / "sha256").iterdir() if d.is_dir()]) == 2


def test_many_layers_fit_the_mount_option_limit(run_inner, tmp_path: Path, cache: Path) -> None:
    """120 layers: their paths exceed one page of mount options; numbered symlinks keep it short."""
    layers = [layer_tar([Entry(f"layers/{i:03d}", content=str(i).encode())]) for i in range(120)]
    write_layout(tmp_path / "layout", layers)
    result = run_inner(
        f"""
        import os, pytest

        @pytest.mark.nsbox(image={f"oci:{tmp_path / 'layout'}"!r})
        def test_all_layers():
            assert sorted(os.listdir("/layers")) == [f"{{i:03d}}" for i in range(120)]
        """,
        "-o",
        f"nsbox_cache_dir={cache}",
    )
    result.assert_outcomes(passed=1)
    assert (cache / "stacks").is_dir()


def test_an_interrupted_import_is_redone_with_a_notice(tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pytest_nsbox.images import oci

    digests = write_layout(tmp_path / "layout", [layer_tar(BASE)])
    hexdigest = digests["0"].split(":")[1]
    stale = cache / "layers" / "sha256" / f".tmp-{hexdigest[:12]}-killed"
    (stale / "etc").mkdir(parents=True)
    (stale / "etc" / "half-written").write_text("x")
    with caplog.at_level("WARNING"):
        dirs = oci.import_image(f"oci:{tmp_path / 'layout'}", tmp_path, cache)
    assert "a previous import was interrupted" in caplog.text
    assert not stale.exists()
    assert (Path(dirs[0]) / "etc" / "os-release").read_text() == "ID=ocitest\n"


def test_umoci_style_whiteouts_one_per_child(run_inner, tmp_path: Path, cache: Path) -> None:
    """umoci marks a replaced directory with one .wh. per removed child and no opaque marker."""
    lower = layer_tar([Entry("d", "dir", mode=0o755), Entry("d/a", content=b"a"), Entry("d/b", content=b"b")])
    upper = layer_tar([Entry("d/a", "whiteout"), Entry("d/b", "whiteout"), Entry("d/c", content=b"c")])
    write_layout(tmp_path / "layout", [lower, upper])
    result = run_inner(
        f"""
        import os, pytest

        @pytest.mark.nsbox(image={f"oci:{tmp_path / 'layout'}"!r})
        def test_only_c():
            assert os.listdir("/d") == ["c"]
        """,
        "-o",
        f"nsbox_cache_dir={cache}",
    )
    result.assert_outcomes(passed=1)


# --- the image's config: Env, WorkingDir, User ------------------------------------------------------

PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
GROUP = b"root:x:0:\napp:x:1000:\nextra:x:1500:app\n"
TOOL = b"#!/bin/sh\necho image-tool\n"
CONFIG = {"Env": ["PATH=/opt/bin:/bin", "FOO=from the image", "PYTHONPATH=/image"], "WorkingDir": "/srv/app", "User": "app"}
SHOW = 'echo "cwd=$(pwd) FOO=$FOO PATH=$PATH HOME=$HOME OUTER=$NSBOX_OUTER"; tool; '
SHOW_IDS = "while read k v rest; do case $k in Uid:|Gid:|Groups:) echo $k $v $rest;; esac; done </proc/self/status"


def _config_image(tmp_path: Path, config: object, kind: str = "oci") -> str:
    """An image with a shell (the host's, with its libraries), a tool in /opt/bin, users and *config*."""
    entries = [
        *host_shell_entries(),
        Entry("etc/passwd", content=PASSWD),
        Entry("etc/group", content=GROUP),
        Entry("opt/bin/tool", content=TOOL, mode=0o755),
        Entry("scratch", "dir", mode=0o1777),
    ]
    layers = [layer_tar(entries, "gzip")]
    if kind == "oci":
        write_layout(tmp_path / "layout", layers, config=config)
        return f"oci:{tmp_path / 'layout'}"
    if kind == "oci-archive":
        write_oci_archive(tmp_path / "image.tar", layers, config=config)
        return f"oci-archive:{tmp_path / 'image.tar'}"
    write_docker_archive(tmp_path / "image.tar", layers, config=config)
    return f"docker-archive:{tmp_path / 'image.tar'}"


OUTER_ENV = "import os\nOUTER = dict(os.environ)  # read in pytest's process (P), before any fork\n"
CHECK_ENV = """
import os, subprocess, pytest
from conftest import OUTER

@pytest.mark.nsbox(image=IMAGE)
def test_env():
    assert os.environ["PATH"] == "/opt/bin:/bin" and os.environ["FOO"] == "from the image"
    assert subprocess.run(["tool"], capture_output=True, text=True).stdout == "image-tool\\n"
    assert os.environ["PYTHONPATH"] == OUTER["PYTHONPATH"]       # pytest's own: kept
    assert os.environ["HOME"] == OUTER["HOME"]                   # not in the image's Env: as in pytest
    assert os.environ["PYTEST_CURRENT_TEST"].endswith("(call)")
    assert os.getcwd() == CWD                                    # WorkingDir: not for tests
    assert os.getuid() == 0                                      # User: not for tests (a warning says so)
"""


@pytest.mark.both_build_modes
@pytest.mark.parametrize("kind", ["oci", "oci-archive", "docker-archive"])
def test_a_test_gets_the_images_env(run_inner, pytester: pytest.Pytester, tmp_path: Path, cache: Path, kind: str) -> None:
    image = _config_image(tmp_path, CONFIG, kind)
    source = CHECK_ENV.replace("IMAGE", repr(image)).replace("CWD", repr(str(pytester.path)))
    result = run_inner(source, "-o", f"nsbox_cache_dir={cache}", conftest=OUTER_ENV)
    result.assert_outcomes(passed=1)
    warning = f"*image '{image}' asks for User 'app'; its sandboxed tests run as root inside (your uid outside):*"
    result.stdout.fnmatch_lines([warning])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"Env": "PATH=/bin"}, "config field Env must be a list of \"KEY=VALUE\" strings, not 'PATH=/bin'"),
        ({"Env": ["FOO=1", "NOEQUALS"]}, "config field Env must be a list of \"KEY=VALUE\" strings; item 1 is 'NOEQUALS'"),
        ({"WorkingDir": "srv/app"}, "config field WorkingDir must be an absolute path, not 'srv/app'"),
        ({"User": "ghost"}, "config field User 'ghost': no user 'ghost' in the image's /etc/passwd"),
        ({"User": "app:ghosts"}, "config field User 'app:ghosts': no group 'ghosts' in the image's /etc/group"),
    ],
)
@pytest.mark.parametrize("kind", ["oci", "docker-archive"])
def test_a_bad_config_is_an_error_naming_the_image_and_the_field(
    run_inner, tmp_path: Path, cache: Path, kind: str, config: object, message: str
) -> None:
    image = _config_image(tmp_path, config, kind)
    result = run_inner(CHECK_ENV.replace("IMAGE", repr(image)), "-o", f"nsbox_cache_dir={cache}", conftest=OUTER_ENV)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*nsbox: image '{image}': {message.replace('[', '[[]')}*"])


@pytest.fixture(autouse=True)
def own_default_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`nsbox shell` uses the default cache: this test's own, not the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def nsbox(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NSBOX_OUTER": "leaked"}
    return subprocess.run(
        [sys.executable, "-m", "pytest_nsbox", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


@pytest.fixture
def other_users_mapped() -> None:
    """Skip unless a sandbox can map ids other than root: as root, or rootless with subordinate ids."""
    result = probe.subordinate_ids()  # ok for root
    if not result.ok:
        pytest.skip(result.describe())


@pytest.mark.usefixtures("other_users_mapped")
@pytest.mark.parametrize(
    ("kind", "user", "ids"),
    [
        ("oci", "app", ["Uid: 1000 1000 1000 1000", "Gid: 1000 1000 1000 1000", "Groups: 1500"]),
        ("docker-archive", "1000:extra", ["Uid: 1000 1000 1000 1000", "Gid: 1500 1500 1500 1500", "Groups:"]),
    ],
)
def test_shell_runs_in_the_workdir_with_the_env_as_the_user(tmp_path: Path, kind: str, user: str, ids: list[str]) -> None:
    image = _config_image(tmp_path, {**CONFIG, "User": user}, kind)
    result = nsbox("shell", image, "--", "sh", "-c", SHOW + SHOW_IDS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "cwd=/srv/app FOO=from the image PATH=/opt/bin:/bin HOME=/home/app OUTER=",  # the caller's env stays out
        "image-tool",
        *ids,
    ]


def test_shell_without_a_user_runs_as_root_with_dockers_defaults(tmp_path: Path) -> None:
    image = _config_image(tmp_path, {"Env": ["FOO=from the image"]})
    result = nsbox("shell", image, "--", "sh", "-c", SHOW.replace("tool; ", "") + SHOW_IDS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == [  # the groups: the caller's, as in a test's sandbox
        "cwd=/ FOO=from the image PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root OUTER=",
        "Uid: 0 0 0 0",
        "Gid: 0 0 0 0",
    ]


def test_shell_refuses_a_user_the_sandbox_cannot_map(tmp_path: Path) -> None:
    image = _config_image(tmp_path, {"User": "70000"})
    result = nsbox("shell", image, "--", "sh", "-c", "echo ran")
    assert result.returncode == 2 and "ran" not in result.stdout
    expected = f"nsbox: image '{image}' asks for User '70000' (uid 70000, gid 0), but a sandbox maps ids 0..65536 only"
    assert expected in result.stderr


RECIPE = """
[base]
image = "IMAGE"

[[steps]]
env = { BAR = "from the recipe" }

[[steps]]
workdir = "data"

[[steps]]
run = "echo \\"$FOO|$BAR|$PATH|$HOME|$(pwd)\\" > /scratch/made; SHOW_IDS >> /scratch/made"
"""

CHECK_RECIPE = """
import os, subprocess, pytest

@pytest.mark.nsbox(image="configured")
def test_recipe_env():
    assert os.environ["PATH"] == "/opt/bin:/bin" and os.environ["FOO"] == "from the image"
    assert os.environ["BAR"] == "from the recipe"
    assert subprocess.run(["tool"], capture_output=True, text=True).stdout == "image-tool\\n"
    made = open("/scratch/made").read()
    assert "".join(line for line in made.splitlines(True) if not (line.startswith("Groups:") and "Groups" not in MADE)) == MADE
"""


@pytest.mark.parametrize("user", ["", "app"])
def test_a_recipe_inherits_the_config_and_adds_its_env_and_workdir(
    run_inner, pytester: pytest.Pytester, tmp_path: Path, user: str, request: pytest.FixtureRequest
) -> None:
    if user:
        request.getfixturevalue("other_users_mapped")
    image = _config_image(tmp_path, {**CONFIG, "User": user})
    recipe = pytester.path / "rootfs_images" / "configured"
    recipe.mkdir(parents=True)
    (recipe / "image.toml").write_text(RECIPE.replace("IMAGE", image).replace("SHOW_IDS", SHOW_IDS.replace('"', '\\"')))
    pytester.makeini(f"[pytest]\nnsbox_cache_dir = {tmp_path / 'cache'}\n")
    uid = "1000" if user else "0"
    made = f"from the image|from the recipe|/opt/bin:/bin|{'/home/app' if user else '/root'}|/srv/app/data\n"
    made += f"Uid: {uid} {uid} {uid} {uid}\nGid: {uid} {uid} {uid} {uid}\n" + ("Groups: 1500\n" if user else "")
    result = run_inner(CHECK_RECIPE.replace("MADE", repr(made)))
    result.assert_outcomes(passed=1)
