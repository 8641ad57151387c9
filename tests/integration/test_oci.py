"""Images imported from OCI layouts, oci-archives and docker-save archives; hostile layers refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from oci_writer import Entry, layer_tar, tree_snapshot, write_docker_archive, write_layout, write_oci_archive

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
