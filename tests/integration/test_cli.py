"""The nsbox command: doctor, shell, images."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tarfile
import time
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
    listing = nsbox("images", "list", "--cache-dir", str(cache)).stdout  # options after the subcommand too
    assert re.search(rf"^{re.escape(ref)} +oci +2 ", listing, re.M), listing
    inspect = nsbox("images", "--cache-dir", str(cache), "inspect", ref).stdout
    assert digests["0"] in inspect and digests["1"] in inspect
    assert nsbox("images", "--cache-dir", str(cache), "prune").stdout.startswith("removed 0 layer(s)")
    dry = nsbox("images", "prune", "--cache-dir", str(cache), "--older-than", "0", "--dry-run").stdout
    assert f"would forget image {ref}" in dry and "would remove 2 layer(s), freeing 2 B" in dry
    assert len(layers_in(cache)) == 2
    pruned = nsbox("images", "--cache-dir", str(cache), "prune", "--older-than", "0").stdout
    assert "removed 2 layer(s), freed 2 B" in pruned
    assert not layers_in(cache)
    missing = nsbox("images", "--cache-dir", str(cache), "import", f"oci:{tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def layers_in(cache: Path) -> list[str]:
    root = cache / "layers" / "sha256"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


RECIPE = '[base]\nbusybox = true\n[[steps]]\nrun = "echo {word} > /word"\n'


def project_with_recipe(root: Path, ini: str, word: str = "one") -> Path:
    """A project whose ini (given as (file name, text)) puts the cache in .nscache and its recipes in images/."""
    (root / "images" / "word").mkdir(parents=True)
    (root / "images" / "word" / "image.toml").write_text(RECIPE.format(word=word))
    name, text = INI_FILES[ini]
    (root / name).write_text(text)
    return root


INI_FILES = {
    "pytest.ini": ("pytest.ini", "[pytest]\nnsbox_cache_dir = .nscache\nnsbox_image_dirs =\n    images\n"),
    "pyproject.toml": (
        "pyproject.toml",
        '[tool.pytest.ini_options]\nnsbox_cache_dir = ".nscache"\nnsbox_image_dirs = ["images"]\n',
    ),
    "tox.ini": ("tox.ini", "[pytest]\nnsbox_cache_dir = .nscache\nnsbox_image_dirs = images\n"),
    "setup.cfg": ("setup.cfg", "[tool:pytest]\nnsbox_cache_dir = .nscache\nnsbox_image_dirs = images\n"),
}


@pytest.mark.parametrize("ini", INI_FILES)
def test_the_cli_reads_the_projects_ini_as_pytest_does(tmp_path: Path, ini: str) -> None:
    project = project_with_recipe(tmp_path, ini)
    (project / "sub").mkdir()
    built = nsbox("images", "build", "word", cwd=project / "sub")  # found from a subdirectory, as pytest finds it
    assert built.returncode == 0, built.stderr
    assert layers_in(project / ".nscache")
    listing = nsbox("images", "list", cwd=project / "sub").stdout
    assert re.search(r"^word +recipe +2 ", listing, re.M) and str(project / ".nscache") in listing, listing


def test_recipe_images_are_listed_inspected_kept_by_prune_and_removed_by_rm(tmp_path: Path) -> None:
    project = project_with_recipe(tmp_path, "pytest.ini")
    assert nsbox("images", "build", "word", cwd=project).returncode == 0
    inspect = nsbox("images", "inspect", "word", cwd=project).stdout
    assert "kind     recipe" in inspect and inspect.count("layer    sha256:") == 2 and "run echo one > /word" in inspect
    assert nsbox("images", "prune", cwd=project).stdout.startswith("removed 0 layer(s)")  # a built recipe is kept
    first = layers_in(project / ".nscache")
    # the recipe changes: its new run layer replaces the old one, which nothing uses any more
    (project / "images" / "word" / "image.toml").write_text(RECIPE.format(word="two"))
    assert nsbox("images", "build", "word", cwd=project).returncode == 0
    dry = nsbox("images", "prune", "--dry-run", cwd=project).stdout
    assert "would remove 1 layer(s)" in dry, dry
    assert len(layers_in(project / ".nscache")) == 3  # --dry-run removed nothing
    assert "removed 1 layer(s)" in nsbox("images", "prune", cwd=project).stdout
    assert len(layers_in(project / ".nscache")) == 2 and len(set(first) & set(layers_in(project / ".nscache"))) == 1
    assert nsbox("images", "rm", "nope", cwd=project).returncode == 1
    removed = nsbox("images", "rm", "word", cwd=project)
    assert removed.returncode == 0 and "forgetting image word" in removed.stdout and "removed 2 layer(s)" in removed.stdout
    assert not layers_in(project / ".nscache")
    assert "no images in" in nsbox("images", "list", cwd=project).stdout


def test_a_recipe_not_built_yet_can_be_inspected(tmp_path: Path) -> None:
    project = project_with_recipe(tmp_path, "pytest.ini")
    inspect = nsbox("images", "inspect", "word", cwd=project)
    assert inspect.returncode == 0, inspect.stderr
    assert "built    no" in inspect.stdout and "step     busybox" in inspect.stdout and "step     run echo one" in inspect.stdout
    assert not layers_in(project / ".nscache")
    assert "recipes not built yet: word" in nsbox("images", "list", cwd=project).stdout


def test_the_content_key_changes_exactly_when_a_rebuild_would(tmp_path: Path) -> None:
    project = project_with_recipe(tmp_path, "pytest.ini")
    key = nsbox("images", "key", "word", cwd=project).stdout.strip()
    assert re.fullmatch("[0-9a-f]{64}", key) and nsbox("images", "key", "word", cwd=project).stdout.strip() == key
    assert not layers_in(project / ".nscache")  # computing it builds nothing
    (project / "unrelated.txt").write_text("x")
    assert nsbox("images", "key", "word", cwd=project).stdout.strip() == key
    nsbox("images", "build", "word", cwd=project)
    assert f"key      {key}" in nsbox("images", "inspect", "word", cwd=project).stdout
    (project / "images" / "word" / "image.toml").write_text(RECIPE.format(word="two"))
    changed = nsbox("images", "key", "word", cwd=project).stdout.strip()
    assert changed != key
    both = nsbox("images", "key", "word", "busybox", cwd=project).stdout.strip()
    assert re.fullmatch("[0-9a-f]{64}", both) and both not in (key, changed)


def test_prune_and_rm_wait_until_no_run_uses_the_cache(tmp_path: Path) -> None:
    project = project_with_recipe(tmp_path, "pytest.ini")
    # the sandbox shares only the inner run's basetemp with the host
    (project / "test_waits.py").write_text(
        "import time\n"
        "from pytest_nsbox import nsbox\n"
        "@nsbox(image='word')\n"
        "def test_waits(tmp_path_factory):\n"
        "    base = tmp_path_factory.getbasetemp()\n"
        "    (base / 'started').touch()\n"
        "    assert open('/word').read() == 'one\\n'\n"
        "    for _ in range(600):\n"
        "        if (base / 'go').exists():\n"
        "            return\n"
        "        time.sleep(0.1)\n"
    )
    base = tmp_path / "base"
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--basetemp={base}", "test_waits.py"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for _ in range(600):
            if (base / "started").exists() or run.poll() is not None:
                break
            time.sleep(0.1)
        assert (base / "started").exists(), run.communicate()[0]
        for command in (["prune", "--older-than", "0"], ["rm", "word"]):
            busy = nsbox("images", *command, cwd=project)
            assert busy.returncode == 1 and "a pytest run is using" in busy.stderr, busy.stderr
        assert len(layers_in(project / ".nscache")) == 2
    finally:
        base.mkdir(exist_ok=True)
        (base / "go").touch()
        output = run.communicate(timeout=120)[0]
    assert run.returncode == 0, output
    assert re.search(r"^word +recipe +2 ", nsbox("images", "list", cwd=project).stdout, re.M)  # the run recorded it
    assert nsbox("images", "rm", "word", cwd=project).returncode == 0


def test_a_build_step_streams_its_output_while_it_runs(tmp_path: Path) -> None:
    recipe = tmp_path / "rootfs_images" / "slow"
    recipe.mkdir(parents=True)
    (recipe / "image.toml").write_text('[base]\nbusybox = true\n[[steps]]\nrun = "echo first line; sleep 600"\n')
    build = subprocess.Popen(
        [sys.executable, "-m", "pytest_nsbox", "images", "--cache-dir", str(tmp_path / "cache"), "build", "slow"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert build.stderr is not None
    try:
        seen = []
        for line in build.stderr:
            seen.append(line)
            if "step 2/2 | first line" in line:
                break
        assert build.poll() is None, "".join(seen)  # shown while the step still runs
    finally:
        build.send_signal(signal.SIGINT)
        build.wait(timeout=60)
    assert build.returncode != 0
    assert not layers_in(tmp_path / "cache")[1:]  # the interrupted step published nothing


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


WHITEOUTS = (
    '[base]\nbusybox = true\n[[steps]]\nrun = "rm /bin/vi && rm -rf /usr/sbin && mkdir /usr/sbin && echo new > /usr/sbin/new'
    ' && ln /usr/sbin/new /usr/sbin/hard"\n'
)


def test_save_and_load_carry_an_image_to_a_new_cache_whiteouts_and_all(tmp_path: Path) -> None:
    """What a CI cache keeps between runs: a recipe loaded into an empty cache is not rebuilt."""
    project = tmp_path / "project"
    (project / "rootfs_images" / "wh").mkdir(parents=True)
    (project / "rootfs_images" / "wh" / "image.toml").write_text(WHITEOUTS)
    (project / "pytest.ini").write_text("[pytest]\nnsbox_cache_dir = .nscache\n")
    assert nsbox("images", "build", "wh", cwd=project).returncode == 0
    saved = nsbox("images", "save", "wh", "-o", str(tmp_path / "images.tar"), cwd=project)
    assert saved.returncode == 0 and "wh: 2 layers" in saved.stdout, saved.stderr
    # a new machine: the same checkout, an empty cache
    remove = nsbox("images", "rm", "wh", cwd=project)
    assert remove.returncode == 0 and not layers_in(project / ".nscache")
    loaded = nsbox("images", "load", "-i", str(tmp_path / "images.tar"), cwd=project)
    assert loaded.returncode == 0 and "wh: 2 layer(s) loaded" in loaded.stdout, loaded.stderr
    (project / "test_image.py").write_text(
        "import os\n"
        "from pytest_nsbox import nsbox\n"
        "@nsbox(image='wh')\n"
        "def test_image():\n"
        "    assert os.path.exists('/bin/sh') and not os.path.exists('/bin/vi')  # a whiteout\n"
        "    assert sorted(os.listdir('/usr/sbin')) == ['hard', 'new']  # an opaque directory\n"
        "    assert os.stat('/usr/sbin/new').st_ino == os.stat('/usr/sbin/hard').st_ino  # a hardlink\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_image.py"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "building image" not in run.stdout + run.stderr  # the loaded layers are the recipe's own


def tree(root: Path) -> dict[str, bytes | str]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink() else oct(p.lstat().st_mode)
        for p in root.rglob("*")
    }


def test_load_refuses_a_corrupt_archive_and_publishes_nothing(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "rootfs_images" / "wh").mkdir(parents=True)
    (project / "rootfs_images" / "wh" / "image.toml").write_text(WHITEOUTS)
    assert nsbox("images", "--cache-dir", str(tmp_path / "cache"), "build", "wh", cwd=project).returncode == 0
    archive = tmp_path / "images.tar"
    assert nsbox("images", "--cache-dir", str(tmp_path / "cache"), "save", "wh", "-o", str(archive), cwd=project).returncode == 0
    data = bytearray(archive.read_bytes())
    where = data.index(b"new\n")  # the content of /usr/sbin/new in the run step's layer
    data[where] = ord("N")
    archive.write_bytes(bytes(data))
    loaded = nsbox("images", "--cache-dir", str(tmp_path / "fresh"), "load", "-i", str(archive))
    assert loaded.returncode == 2 and "blob is corrupt" in loaded.stderr, loaded.stderr
    assert "no images in" in nsbox("images", "--cache-dir", str(tmp_path / "fresh"), "list").stdout
    for layer in layers_in(tmp_path / "fresh"):  # only intact layers, loaded before the corrupt one
        assert tree(tmp_path / "fresh" / "layers" / "sha256" / layer) == tree(tmp_path / "cache" / "layers" / "sha256" / layer)
    not_ours = tmp_path / "other.tar"
    with tarfile.open(not_ours, "w") as other:
        other.add(project / "rootfs_images", "rootfs_images")
    refused = nsbox("images", "--cache-dir", str(tmp_path / "fresh"), "load", "-i", str(not_ours))
    assert refused.returncode == 2 and "not written by nsbox images save" in refused.stderr


def test_shell_says_why_a_command_cannot_run() -> None:
    missing = nsbox("shell", "host", "--", "no-such-command-anywhere")
    assert missing.returncode == 127
    assert "nsbox: cannot run 'no-such-command-anywhere' in the sandbox: No such file" in missing.stderr
    not_runnable = nsbox("shell", "host", "--", "/etc/hostname")
    assert not_runnable.returncode == 126
    assert "cannot run '/etc/hostname' in the sandbox: Permission denied" in not_runnable.stderr


def test_shell_env_and_workdir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NSBOX_FROM_CALLER", "yes")
    show = "echo $FOO $NSBOX_FROM_CALLER; pwd"
    result = nsbox("shell", "-e", "FOO=bar", "-e", "NSBOX_FROM_CALLER", "-w", "/etc", "host", "--", "sh", "-c", show)
    assert result.returncode == 0 and result.stdout.split() == ["bar", "yes", "/etc"], result.stderr


def test_shell_disk_bound() -> None:
    result = nsbox("shell", "--disk", "8M", "host", "--", "sh", "-c", "head -c 20000000 /dev/zero > /tmp/big")
    assert result.returncode == 1 and "No space left on device" in result.stderr
    bad = nsbox("shell", "--disk", "lots", "host", "true")
    assert bad.returncode == 2 and "invalid disk 'lots' from option --disk" in bad.stderr


def test_shell_timeout() -> None:
    result = nsbox("shell", "--timeout", "1", "host", "--", "sleep", "30")
    assert result.returncode == 124 and "nsbox: the command timed out after 1.0s" in result.stderr


@pytest.mark.needs_cgroup_limits
def test_shell_memory_and_pids_limits() -> None:
    # a shell's sandbox has a fresh /tmp (a venv under /tmp is not there): a memory hog from /usr/bin
    hog = "from array import array; x = array('b', bytes(1 << 30))"
    oom = nsbox("shell", "--memory", "64M", "host", "--", "/usr/bin/python3", "-c", hog)
    assert oom.returncode == 137 and "nsbox: the command exceeded its memory limit of 64 MiB" in oom.stderr, oom.stderr
    forks = nsbox("shell", "--pids", "5", "host", "--", "sh", "-c", "for i in 1 2 3 4 5 6 7 8; do sleep 1 & done; wait")
    assert "nsbox: pids limit 5 reached" in forks.stderr, forks.stderr
