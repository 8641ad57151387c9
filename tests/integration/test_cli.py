"""The nsbox command: doctor, shell, images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from oci_writer import Entry, layer_tar, write_layout

pytestmark = [pytest.mark.needs_userns, pytest.mark.needs_overlay_userns]


def nsbox(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_nsbox", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_doctor_reports_each_capability() -> None:
    result = nsbox("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "user namespaces: ok" in result.stdout and "overlayfs in a user namespace: ok" in result.stdout


def test_shell_runs_a_command_in_a_throwaway_sandbox(tmp_path: Path) -> None:
    marker = tmp_path / "written-inside"
    result = nsbox("shell", "host", "--", "sh", "-c", f"hostname; touch {marker}; exit 3")
    assert result.returncode == 3 and result.stdout.strip() == "nsbox"
    assert not marker.exists()  # tmp_path is under the host's /tmp: the sandbox had a fresh one


def test_images_import_list_inspect_prune(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    digests = write_layout(tmp_path / "layout", [layer_tar([Entry("a", content=b"1")]), layer_tar([Entry("b", content=b"2")])])
    ref = f"oci:{tmp_path / 'layout'}"
    assert nsbox("images", "--cache-dir", str(cache), "import", ref).returncode == 0
    listing = nsbox("images", "--cache-dir", str(cache), "list").stdout
    assert ref in listing and " 2 " in listing
    inspect = nsbox("images", "--cache-dir", str(cache), "inspect", ref).stdout
    assert digests["0"] in inspect and digests["1"] in inspect
    assert nsbox("images", "--cache-dir", str(cache), "prune").stdout.strip() == "removed 0 layer(s)"
    assert nsbox("images", "--cache-dir", str(cache), "prune", "--older-than", "0").stdout.strip() == "removed 2 layer(s)"
    assert not [p for p in (cache / "layers" / "sha256").iterdir() if p.is_dir()]
    missing = nsbox("images", "--cache-dir", str(cache), "import", f"oci:{tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_images_build_a_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "rootfs_images" / "tiny"
    recipe.mkdir(parents=True)
    (recipe / "image.toml").write_text("[base]\nscratch = true\n")
    result = nsbox("images", "--cache-dir", str(tmp_path / "cache"), "build", "tiny", cwd=tmp_path)
    assert result.returncode == 0 and "tiny: 1 layers" in result.stdout, result.stderr
    assert "building image tiny: step 1/1" in result.stderr
    missing = nsbox("images", "--cache-dir", str(tmp_path / "cache"), "build", "nope", cwd=tmp_path)
    assert missing.returncode == 2 and "known: tiny, busybox, debian-bookworm" in missing.stderr


def test_images_build_a_shipped_recipe_outside_any_project(tmp_path: Path) -> None:
    result = nsbox("images", "--cache-dir", str(tmp_path / "cache"), "build", "busybox", cwd=tmp_path)
    assert result.returncode == 0 and "busybox: 1 layers" in result.stdout, result.stderr
