"""Debian images as root and as an ordinary user (rootless: mmdebstrap --mode=unshare, run steps
with subordinate ids mapped), and what a rootless build says when subordinate ids are missing."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_nsbox.box import subids
from pytest_nsbox.images import recipes

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]
REPO_IMAGES = Path(__file__).resolve().parents[2] / "rootfs_images"
needs_mmdebstrap = pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="needs mmdebstrap")

SERVICE_STEP = (
    "useradd --system --home-dir /var/lib/svc svc && install -d -o svc -g svc -m 0750 /var/lib/svc"
    " && install -o svc -g svc -m 4755 /dev/null /var/lib/svc/tool && rm /etc/issue"
    " && apt-get update -q && rm -rf /var/lib/apt/lists/*"  # apt's downloads run as _apt
)
SERVICE = f'[base]\nrecipe = "debian-bookworm"\n\n[[steps]]\nrun = "{SERVICE_STEP}"\n'


def _session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of this session that every xdist worker shares (their basetemps' parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def debian_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A layer cache with debian-bookworm and debian-bookworm-curl, built once per session: xdist
    workers share it, and the build's file lock makes all but one wait for the layers."""
    cache = _session_dir(tmp_path_factory) / "debian-cache"
    recipe = recipes.find("debian-bookworm-curl", [REPO_IMAGES])
    assert recipe is not None
    recipes.RecipeBuilder(cache, [REPO_IMAGES]).build(recipe)
    return cache


def _use_cache(pytester: pytest.Pytester, cache: Path) -> None:
    pytester.makeini(f"[pytest]\nnsbox_cache_dir = {cache}\nnsbox_image_dirs = {REPO_IMAGES}\n")


@needs_mmdebstrap
@pytest.mark.slow
@pytest.mark.needs_subuid
def test_debian_bookworm_is_debian_and_root_may_change_it(run_inner, pytester: pytest.Pytester, debian_cache: Path) -> None:
    _use_cache(pytester, debian_cache)
    result = run_inner(
        """
        import os, pytest

        @pytest.mark.nsbox(image="debian-bookworm")
        def test_debian():
            assert "VERSION_CODENAME=bookworm" in open("/etc/os-release").read()
            assert not os.path.exists("/usr/share/man/man1")          # docs left out
            assert not os.path.exists("/usr/bin/curl")
            os.remove("/etc/shadow")                                   # the image is root's in the sandbox
            open("/usr/bin/new", "w").close()
        """
    )
    result.assert_outcomes(passed=1)


@needs_mmdebstrap
@pytest.mark.slow
@pytest.mark.needs_subuid
def test_debian_bookworm_curl_runs_curl(run_inner, pytester: pytest.Pytester, debian_cache: Path) -> None:
    _use_cache(pytester, debian_cache)
    result = run_inner(
        """
        import subprocess, pytest

        @pytest.mark.nsbox(image="debian-bookworm-curl")
        def test_curl():
            version = subprocess.run(["curl", "--version"], capture_output=True, text=True, check=True).stdout
            assert version.startswith("curl ")
        """
    )
    result.assert_outcomes(passed=1)


def _foreign_entries(tree: Path) -> list[str]:
    """Entries under *tree* that are not the caller's on disk."""
    mine = (os.getuid(), os.getgid())
    return [
        os.path.join(root, name)
        for root, dirs, files in os.walk(tree)
        for name in (*dirs, *files)
        if (os.lstat(os.path.join(root, name)).st_uid, os.lstat(os.path.join(root, name)).st_gid) != mine
    ]


@needs_mmdebstrap
@pytest.mark.slow
@pytest.mark.needs_nonroot
@pytest.mark.needs_subuid
def test_rootless_debian_layers_are_the_callers(debian_cache: Path) -> None:
    layers = [p for p in (debian_cache / "layers" / "sha256").iterdir() if p.is_dir()]
    assert len(layers) >= 2
    for layer in layers:
        assert _foreign_entries(layer) == []


@needs_mmdebstrap
@pytest.mark.slow
@pytest.mark.needs_subuid
def test_run_step_switches_users_and_changes_owners(
    run_inner, pytester: pytest.Pytester, debian_cache: Path, tmp_path: Path
) -> None:
    base = recipes.find("debian-bookworm", [REPO_IMAGES])
    assert base is not None
    (base_layer,) = recipes.RecipeBuilder(debian_cache, [REPO_IMAGES]).build(base)  # cached
    cache = tmp_path / "cache"  # a cache of its own, seeded with the base, so that it can be pruned
    shutil.copytree(base_layer, cache / "layers" / "sha256" / Path(base_layer).name, symlinks=True, copy_function=os.link)
    (pytester.path / "rootfs_images" / "service").mkdir(parents=True)
    (pytester.path / "rootfs_images" / "service" / "image.toml").write_text(SERVICE)
    _use_cache(pytester, cache)
    result = run_inner(
        """
        import os, pytest

        @pytest.mark.nsbox(image="service")
        def test_service():
            assert "svc:x:" in open("/etc/passwd").read()              # useradd ran
            st = os.stat("/var/lib/svc/tool")
            assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o4755)  # owner collapsed, setuid kept
            assert not os.path.exists("/etc/issue")                     # a deletion: a whiteout
            open("/var/lib/svc/new", "w").close()
        """
    )
    result.assert_outcomes(passed=1)
    layers = [p for p in (cache / "layers" / "sha256").iterdir() if p.is_dir()]
    assert len(layers) == 2
    # Rootless, every layer is the caller's; as root, mmdebstrap's base keeps Debian's owners.
    checked = layers if os.getuid() != 0 else [p for p in layers if p.name != Path(base_layer).name]
    assert checked and all(_foreign_entries(layer) == [] for layer in checked)
    pruned = subprocess.run(
        [sys.executable, "-m", "pytest_nsbox", "images", "--cache-dir", str(cache), "prune", "--older-than", "0"],
        capture_output=True,
        text=True,
    )  # forget the image the run recorded: the caller can remove every layer it built
    assert pruned.returncode == 0 and "removed 2 layer(s)" in pruned.stdout, pruned.stderr
    assert not [p for p in (cache / "layers" / "sha256").iterdir() if p.is_dir()]


def _no_subuid(tmp_path: Path) -> tuple[Path, str]:
    subuid = tmp_path / "subuid"
    subuid.write_text("someoneelse:100000:65536\n")
    return subuid, pwd.getpwuid(os.getuid()).pw_name


@pytest.mark.needs_nonroot
def test_rootless_debian_without_subuid_says_what_is_missing(tmp_path: Path) -> None:
    subuid, user = _no_subuid(tmp_path)
    recipe = recipes.find("debian-bookworm", [REPO_IMAGES])
    assert recipe is not None
    builder = recipes.RecipeBuilder(tmp_path / "cache", [REPO_IMAGES], progress=lambda line: None, subuid_file=subuid)
    with pytest.raises(recipes.RecipeError) as caught:
        builder.build(recipe)
    message = str(caught.value)
    assert recipes.DEBIAN_ROOTLESS in message
    assert subids.NO_ENTRY.format(file=subuid, kind="uid", user=user, uid=os.getuid()) in message
    first = subids.free_start(subuid, subids.SUBGID_FILE)  # after every range given out
    usermod = f"usermod --add-subuids {first}-{first + 65535} --add-subgids {first}-{first + 65535} {user}"
    assert f"Hint: as root: {usermod}" in message
    assert [p.name for p in (tmp_path / "cache" / "layers" / "sha256").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.needs_nonroot
@pytest.mark.skipif(not os.access("/bin/busybox", os.X_OK), reason="needs busybox-static")
def test_rootless_run_step_without_subuid_says_what_is_missing(tmp_path: Path) -> None:
    subuid, user = _no_subuid(tmp_path)
    (tmp_path / "images" / "owners").mkdir(parents=True)
    (tmp_path / "images" / "owners" / "image.toml").write_text(
        "[base]\nbusybox = true\n[[steps]]\nrun = 'chown 42 /etc/passwd'\n"
    )
    recipe = recipes.find("owners", [tmp_path / "images"])
    assert recipe is not None
    builder = recipes.RecipeBuilder(tmp_path / "cache", [tmp_path / "images"], progress=lambda line: None, subuid_file=subuid)
    with pytest.raises(recipes.RecipeError) as caught:
        builder.build(recipe)
    message = str(caught.value)
    assert "run 'chown 42 /etc/passwd' failed (1)" in message
    assert recipes.SINGLE_UID_NOTE.split("{")[0] in message
    assert subids.NO_ENTRY.format(file=subuid, kind="uid", user=user, uid=os.getuid()) in message


@pytest.mark.needs_nonroot
@pytest.mark.needs_subuid
@pytest.mark.skipif(not os.access("/bin/busybox", os.X_OK), reason="needs busybox-static")
def test_rootless_run_step_reports_a_mapping_that_newuidmap_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "images" / "steps").mkdir(parents=True)
    (tmp_path / "images" / "steps" / "image.toml").write_text("[base]\nbusybox = true\n[[steps]]\nrun = 'true'\n")
    recipe = recipes.find("steps", [tmp_path / "images"])
    assert recipe is not None
    real = recipes.RecipeBuilder.id_mapping
    monkeypatch.setattr(recipes.RecipeBuilder, "id_mapping", lambda self: replace(real(self), subuid=subids.Range(1, 65536)))
    builder = recipes.RecipeBuilder(tmp_path / "cache", [tmp_path / "images"], progress=lambda line: None)
    with pytest.raises(recipes.RecipeError) as caught:
        builder.build(recipe)
    message = str(caught.value)
    assert "the build sandbox failed at map_subordinate_ids" in message
    assert f" 0 {os.getuid()} 1 1 1 65536 failed (1): newuidmap: " in message  # the command, what newuidmap said
