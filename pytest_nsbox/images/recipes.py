"""Image recipes: ``rootfs_images/<name>/image.toml``, a base plus steps, each step one cached layer.

A name is looked up in the ini's ``nsbox_image_dirs``, the project's ``rootfs_images/``, then the
recipes shipped with pytest-nsbox (``shipped_dir``); the first match wins.

```toml
[base]                      # exactly one of:
debian = "bookworm"         #   mmdebstrap minbase, merged-usr, no docs or locales
# busybox = true            #   the static busybox of the host (package busybox-static)
# scratch = true            #   nothing
# image = "oci-archive:app.tar"   # an imported image
# recipe = "debian-bookworm"      # another recipe

[[steps]]
run = "apt-get -o APT::Sandbox::User=root install -y --no-install-recommends curl"
[[steps]]
copy = { from = "files/motd", to = "/etc/motd" }
[[steps]]
env = { LANG = "C.UTF-8" }        # for the run steps after it, and the image's Env
[[steps]]
workdir = "/srv"                  # the cwd of later run steps, and the image's WorkingDir
```

A layer's key is the hash of its parent's key and its own definition (plus the content of the
files a ``copy`` step takes), so changing step 3 rebuilds from step 3 on, like a Dockerfile. A
``run`` step runs ``/bin/sh -c`` in a sandbox over the layers so far (network "host"), and its
writable layer, whiteouts included, becomes the step's layer.

A recipe's image has a config (``ImageConfig``) like an imported image: its base's (an imported
image's, a base recipe's; none for debian, busybox and scratch), with its ``env`` steps added to
the Env and its ``workdir`` steps setting the WorkingDir, like a Dockerfile's FROM, ENV and
WORKDIR. A ``run`` step runs with that Env over ``DEFAULT_ENV``, in the WorkingDir (created if
missing), as the base image's User (which must be mapped: see below).

Rootless (see ``subids``): the debian base is built with ``mmdebstrap --mode=unshare`` into a tar
stream that is extracted as the caller, so every file is the caller's (root in a sandbox) and the
image's other owners collapse to root. A ``run`` step gets the subordinate ids mapped (root inside
is the caller, 1..65536 a subordinate range), so apt, dpkg and useradd can switch users and change
owners; before the layer is published, everything in it is given back to root inside (the
caller), so the single-uid sandbox of a test can use it and the caller can delete it. Without
subordinate ids a ``run`` step maps only the caller's uid, and its failure says what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from ..box import mounts, subids
from ..box.config import SandboxConfig
from ..box.supervise import run_once
from ..box.wire import Channel
from . import cache, oci
from .config import ImageConfig, ImageUser, become, resolve_user, run_environment
from .errors import RecipeError
from .extract import RefusedMember, extract_layer

log = logging.getLogger(__name__)

RECIPE_FILE: Final = "image.toml"
SHIPPED_FOLDER: Final = "rootfs_images"  # a project's recipes, and the package data of the shipped ones
OUTPUT_TAIL: Final = 4000  # characters of a failed step's output in its error
BASES: Final = ("debian", "busybox", "scratch", "image", "recipe")
STEP_KINDS: Final = ("run", "copy", "env", "workdir")
BUSYBOX: Final = "/bin/busybox"
DEBIAN_EXCLUDES: Final = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
DEFAULT_ENV: Final = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
    "LANG": "C.UTF-8",
}


NO_MMDEBSTRAP: Final = "mmdebstrap is not installed (apt install mmdebstrap)"
DEBIAN_ROOTLESS: Final = "as an ordinary user it is built by mmdebstrap --mode=unshare, which needs subordinate ids"
SINGLE_UID_NOTE: Final = (
    "note: this step ran with only your uid mapped (as root), so commands that switch users or change owners "
    "(apt without APT::Sandbox::User=root, dpkg, useradd, chown) fail; {reason}"
)
USER_NOT_MAPPED: Final = (
    "the image asks for User {user!r} (uid {uid}, gid {gid}), but this run step maps only your uid (as root): {reason}"
)
USER_OUT_OF_RANGE: Final = "the image asks for User {user!r} (uid {uid}, gid {gid}); a run step maps ids 0..{last} only"


@dataclass(frozen=True, slots=True)
class Recipe:
    name: str
    path: Path  # the image.toml
    base: tuple[str, Any]
    steps: tuple[dict[str, Any], ...]

    @property
    def dir(self) -> Path:
        return self.path.parent


def shipped_dir() -> Path:
    """The recipes shipped with pytest-nsbox (busybox, debian-bookworm, ...).

    Installed from a wheel they are package data, ``pytest_nsbox/rootfs_images/`` (pyproject.toml
    maps the repository's top-level ``rootfs_images/`` there); run from a source checkout (an
    editable install) they are that top-level folder itself.
    """
    package = Path(__file__).resolve().parent.parent
    installed = package / SHIPPED_FOLDER
    return installed if installed.is_dir() else package.parent / SHIPPED_FOLDER


def search_dirs(rootdir: Path, extra: Sequence[str]) -> list[Path]:
    """Recipe folders, first match wins: the ini's nsbox_image_dirs (relative to the rootdir), the
    project's rootfs_images/, then the shipped recipes."""
    dirs = [Path(d) if os.path.isabs(d) else rootdir / d for d in extra]
    dirs.append(rootdir / SHIPPED_FOLDER)
    shipped = shipped_dir()
    if not any(_same_dir(folder, shipped) for folder in dirs):  # not when the project is pytest-nsbox itself
        dirs.append(shipped)
    return dirs


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def known_images(dirs: Sequence[Path]) -> list[str]:
    """The recipe names in dirs, in search order (a project's own before the shipped ones), each once."""
    names: dict[str, None] = {}
    for folder in dirs:
        if folder.is_dir():
            names.update(dict.fromkeys(sorted(p.parent.name for p in folder.glob(f"*/{RECIPE_FILE}"))))
    return list(names)


def find(name: str, dirs: Sequence[Path]) -> Recipe | None:
    if "/" in name or name.startswith("."):
        return None
    for folder in dirs:
        path = folder / name / RECIPE_FILE
        if path.is_file():
            return parse(path)
    return None


def parse(path: Path) -> Recipe:
    """Read and check a recipe; errors name the file and the field."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"{path}: {exc}") from None
    unknown = set(data) - {"base", "steps"}
    if unknown:
        raise RecipeError(f"{path}: unknown field(s) {sorted(unknown)} (expected 'base' and 'steps')")
    base = data.get("base")
    if not isinstance(base, dict) or len(base) != 1 or next(iter(base)) not in BASES:
        raise RecipeError(f"{path}: field 'base' must have exactly one of {', '.join(BASES)}")
    kind, value = next(iter(base.items()))
    if kind in ("debian", "image", "recipe") and not (isinstance(value, str) and value):
        raise RecipeError(f"{path}: field 'base.{kind}' must be a non-empty string")
    steps = data.get("steps", [])
    if not isinstance(steps, list):
        raise RecipeError(f"{path}: field 'steps' must be an array of tables ([[steps]])")
    for number, step in enumerate(steps, 1):
        where = f"{path}: steps[{number}]"
        if not isinstance(step, dict) or len(step) != 1 or next(iter(step)) not in STEP_KINDS:
            raise RecipeError(f"{where} must have exactly one of {', '.join(STEP_KINDS)}")
        step_kind, argument = next(iter(step.items()))
        if step_kind in ("run", "workdir") and not (isinstance(argument, str) and argument):
            raise RecipeError(f"{where}.{step_kind} must be a non-empty string")
        if step_kind == "env" and not (
            isinstance(argument, dict)
            and all(isinstance(v, str) and "\0" not in v for v in argument.values())
            and all(k and "=" not in k and "\0" not in k for k in argument)
        ):
            raise RecipeError(f"{where}.env must be a table of strings (keys without '=')")
        if step_kind == "copy":
            if not (isinstance(argument, dict) and set(argument) == {"from", "to"} and str(argument["to"]).startswith("/")):
                raise RecipeError(f"{where}.copy must be {{ from = 'relative/path', to = '/absolute/path' }}")
            source = (path.parent / str(argument["from"])).resolve()
            if not source.is_relative_to(path.parent.resolve()) or not source.exists():
                raise RecipeError(f"{where}.copy.from {argument['from']!r}: no such file in {path.parent}")
    return Recipe(path.parent.name, path, (kind, value), tuple(steps))


def describe_step(kind: str, argument: Any) -> str:
    """One line for a base or a step: "debian bookworm", "busybox", "run apt-get ...", "copy a -> /b"."""
    if argument is True:
        return kind
    if kind == "copy" and isinstance(argument, dict):
        return f"copy {argument.get('from')} -> {argument.get('to')}"
    if kind == "env" and isinstance(argument, dict):
        return "env " + " ".join(f"{k}={v}" for k, v in argument.items())
    return f"{kind} {argument}"


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for item in sorted([path, *path.rglob("*")] if path.is_dir() else [path]):
        digest.update(str(item.relative_to(path.parent)).encode() + b"\0")
        if item.is_file() and not item.is_symlink():
            digest.update(hashlib.sha256(item.read_bytes()).digest())
        elif item.is_symlink():
            digest.update(os.readlink(item).encode())
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class _Walk:
    layers: list[str]  # layer directories, bottom first
    history: list[str]  # what made each
    key: str  # the top layer's key: the recipe's content key
    config: ImageConfig  # the image's config (see the module)


class OutputFollower:
    """Shows a build step's output while the step runs: a thread that reads the step's log file
    as it grows. ``lines=True`` passes on every line (``nsbox images build``); otherwise, after
    ``QUIET_AFTER`` seconds without a report, the elapsed time and the last line (a test run).

    Start it only once the step's process is forked (``run_once``'s *while_running*, or after
    ``Popen``): P must not fork while the thread runs.
    """

    POLL: Final = 0.25
    QUIET_AFTER: Final = 10.0

    def __init__(self, log_path: Path, label: str, emit: Callable[[str], None], *, lines: bool) -> None:
        self.path, self._label, self._emit, self._lines = log_path, label, emit, lines
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = time.monotonic()

    def start(self) -> None:
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._follow, name="nsbox-build-output", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _follow(self) -> None:
        last_line, pending, reported = "", b"", time.monotonic()
        with open(self.path, "rb") as log_file:
            while True:
                stopping = self._stop.wait(self.POLL)
                pending += log_file.read(1 << 16)
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    line = raw.decode(errors="replace").rstrip("\r").rsplit("\r", 1)[-1].rstrip()
                    if line:
                        last_line = line
                        if self._lines:
                            self._emit(f"{self._label} | {line}")
                            reported = time.monotonic()
                if stopping:
                    return
                if time.monotonic() - reported >= self.QUIET_AFTER:
                    elapsed = time.monotonic() - self._start
                    self._emit(f"{self._label}: running for {elapsed:.0f}s" + (f": {last_line[:160]}" if last_line else ""))
                    reported = time.monotonic()


@dataclass
class RecipeBuilder:
    """Builds recipes into cached layers; *progress* gets a line when a step starts and ends,
    and its output while it runs: every line with *output_lines*, else now and then the last."""

    cache: Path
    dirs: Sequence[Path]
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    output_lines: bool = False
    subuid_file: Path = subids.SUBUID_FILE  # where rootless builds look up subordinate ids
    subgid_file: Path = subids.SUBGID_FILE

    def id_mapping(self) -> subids.IdMapping:
        """The full id mapping of a rootless build; SubordinateIdError says what is missing."""
        return subids.find_mapping(subuid_file=self.subuid_file, subgid_file=self.subgid_file)

    def build(self, recipe: Recipe) -> list[str]:
        """The recipe's layer directories, bottom first, building what is not cached; the image
        is remembered in the cache (``nsbox images list``, and ``prune`` keeps its layers)."""
        return self._walk(recipe, build=True).layers

    def build_with_config(self, recipe: Recipe) -> tuple[list[str], ImageConfig]:
        """What build() returns, and the recipe's image's config (see the module)."""
        walk = self._walk(recipe, build=True)
        return walk.layers, walk.config

    def content_key(self, recipe: Recipe) -> str:
        """A key that changes exactly when the recipe's layers would: its base, its steps, the
        files its copy steps take, the recipes and images it builds on. Nothing is built."""
        return self._walk(recipe, build=False).key

    def _walk(self, recipe: Recipe, *, build: bool, seen: tuple[str, ...] = ()) -> _Walk:
        if recipe.name in seen:
            raise RecipeError(f"{recipe.path}: base recipe cycle {' -> '.join((*seen, recipe.name))}")
        kind, value = recipe.base
        total = 1 + len(recipe.steps)
        if kind == "recipe":
            parent = find(str(value), self.dirs)
            if parent is None:
                raise RecipeError(f"{recipe.path}: base.recipe {value!r} not found in {[str(d) for d in self.dirs]}")
            below = self._walk(parent, build=build, seen=(*seen, recipe.name))
            layers, history, config = list(below.layers), list(below.history), below.config
            key = _key("recipe", [Path(layer).name for layer in layers])
        elif kind == "image":
            if build:
                top_first, config = oci.import_with_config(str(value), recipe.dir, self.cache)
                layers = top_first[::-1]
            else:
                _kind, _path, imported, config = oci.image_contents(str(value), recipe.dir)
                layers = [str(cache.layer_dir(self.cache, layer.digest)) for layer in imported]
            history = [f"image {value}: layer {Path(layer).name}" for layer in layers]
            key = _key("image", [Path(layer).name for layer in layers])
        else:
            key = _key(kind, value, _tool_identity(kind))
            what = describe_step(kind, value)
            layers = [self._layer(key, recipe, 1, total, what, lambda dest: _build_base(kind, value, dest, self), build)]
            history = [what]
            config = ImageConfig()
        for number, step in enumerate(recipe.steps, 2):
            step_kind, argument = next(iter(step.items()))
            if step_kind == "env":
                config = config.with_env(argument)
                continue
            if step_kind == "workdir":
                config = config.with_workdir(argument)
                continue
            if step_kind == "copy":
                source = recipe.dir / argument["from"]
                key = _key(key, step, _tree_hash(source))
                what = describe_step(step_kind, argument)
                layers.append(self._layer(key, recipe, number, total, what, _copier(source, argument["to"]), build))
            else:
                # the key holds the User as the image gives it: the ids and the home it resolves to
                # follow from the layers below, which the key holds too
                env = run_environment(config, None, DEFAULT_ENV)
                workdir = config.workdir or "/"
                key = _key(key, step, env, workdir, *([config.user] if config.user else []))
                what = describe_step(step_kind, argument)
                label = f"nsbox: building image {recipe.name}: step {number}/{total}"
                runner = _runner(tuple(layers[::-1]), argument, config, self, label, recipe.name)
                layers.append(self._layer(key, recipe, number, total, what, runner, build))
            history.append(what)
        if build:
            digests = [f"sha256:{Path(layer).name}" for layer in layers]
            cache.record_image(self.cache, recipe.name, recipe.path, digests, kind="recipe", history=history, key=key)
        return _Walk(layers, history, key, config)

    def _layer(
        self, key: str, recipe: Recipe, number: int, total: int, what: str, build: Callable[[Path], None], now: bool
    ) -> str:
        final = cache.layer_dir(self.cache, key)
        if final.is_dir() or not now:
            return str(final)

        def interrupted() -> None:
            self.progress(f"nsbox: {recipe.name}: step {number}/{total} was interrupted before; building it again")

        def timed_build(tmp: Path) -> None:
            start = time.monotonic()
            self.progress(f"nsbox: building image {recipe.name}: step {number}/{total}: {what}")
            build(tmp)
            self.progress(f"nsbox: building image {recipe.name}: step {number}/{total} done in {time.monotonic() - start:.1f}s")

        return str(cache.publish_layer(final, timed_build, interrupted=interrupted))


def _tool_identity(kind: str) -> str:
    if kind == "busybox":
        try:
            return hashlib.sha256(Path(BUSYBOX).read_bytes()).hexdigest()
        except OSError:
            return "missing"
    return ""


def _build_base(kind: str, value: Any, tmp: Path, builder: RecipeBuilder) -> None:
    layer = tmp / "layer"
    if kind == "scratch":
        layer.mkdir()
    elif kind == "busybox":
        _build_busybox(layer)
    elif kind == "debian":
        _build_debian(str(value), layer, builder)


def _build_busybox(layer: Path) -> None:
    if not os.access(BUSYBOX, os.X_OK):
        raise RecipeError(f"base busybox needs {BUSYBOX} (Debian package busybox-static)")
    for name in ("bin", "etc", "tmp", "root", "proc", "sys", "dev", "run", "usr/bin", "usr/sbin", "sbin"):
        (layer / name).mkdir(parents=True)
    shutil.copy2(BUSYBOX, layer / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        target = layer / applet
        if not target.exists() and target.parent.is_dir():
            os.symlink(os.path.relpath(layer / "bin" / "busybox", target.parent), target)
    (layer / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (layer / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    os.chmod(layer / "tmp", 0o1777)


def debian_command(suite: str, target: Path | str, *, mode: str = "root") -> list[str]:
    """The mmdebstrap call of a debian base: minbase, merged-usr, no docs, man pages or locales.

    *mode* "root" writes the tree to the directory *target*; "unshare" (an ordinary user with
    subordinate ids) writes a tar to *target* ("-": stdout).
    """
    return [
        "mmdebstrap",
        "--quiet",
        f"--mode={mode}",
        *(["--format=tar"] if mode == "unshare" else []),
        "--variant=minbase",
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        *[f"--dpkgopt={option}" for option in DEBIAN_EXCLUDES],
        suite,
        str(target),
    ]


def _build_debian(suite: str, layer: Path, builder: RecipeBuilder) -> None:
    problems = [] if shutil.which("mmdebstrap") else [NO_MMDEBSTRAP]
    if os.geteuid() != 0:
        try:
            builder.id_mapping()
        except subids.SubordinateIdError as exc:
            problems.append(f"{DEBIAN_ROOTLESS}; {exc}")
    if problems:
        raise RecipeError(f"base debian {suite!r}: " + "; ".join(problems))
    label = f"nsbox: mmdebstrap {suite}"
    if os.geteuid() != 0:
        following = OutputFollower(layer.parent / "mmdebstrap.log", label, builder.progress, lines=builder.output_lines)
        _build_debian_rootless(suite, layer, following)
        return
    # In a mount namespace of its own, mmdebstrap's mounts (/dev, /proc, /sys in the target) never
    # show in the host's mount table, and a build killed half-way leaves none behind.
    command = ["unshare", "--mount", "--propagation", "private", *debian_command(suite, layer)]
    log_path = layer.parent / "mmdebstrap.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    following = OutputFollower(log_path, label, builder.progress, lines=builder.output_lines)
    following.start()
    try:
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        following.stop()
    if code != 0:
        raise RecipeError(f"mmdebstrap {suite} failed ({code}):\n{log_path.read_text(errors='replace')[-OUTPUT_TAIL:]}")


def _build_debian_rootless(suite: str, layer: Path, following: OutputFollower) -> None:
    """mmdebstrap --mode=unshare into a tar stream, extracted as the caller by the safe extractor.

    The tar headers carry the owners inside the image; extracted without privileges, every file
    becomes the caller's, which is root in a sandbox. What is lost: the few files that Debian
    gives other owners (``_apt``'s partial dirs, group ``shadow`` of ``/etc/shadow`` and ``chage``,
    group ``mail`` of ``/var/mail``) are root's in the image. A sandbox maps only root, so such
    owners would be unusable there anyway. Device nodes in the tar are skipped (a sandbox has
    its own ``/dev``).
    """
    layer.mkdir()
    with open(following.path, "w+b") as errors:
        proc = subprocess.Popen(debian_command(suite, "-", mode="unshare"), stdout=subprocess.PIPE, stderr=errors)
        assert proc.stdout is not None
        failure: Exception | None = None
        following.start()
        try:
            with proc.stdout:
                extract_layer(proc.stdout, layer, as_root=False)
                while proc.stdout.read(1 << 16):
                    pass  # the tar's padding: mmdebstrap must not die of SIGPIPE
        except (OSError, tarfile.TarError, RefusedMember) as exc:
            failure = exc
            proc.kill()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            following.stop()
        code = proc.wait()
        errors.seek(0)
        output = errors.read().decode(errors="replace")[-OUTPUT_TAIL:]
    if code != 0 and not (failure is not None and code == -signal.SIGKILL):  # killed by us: the tar was bad
        raise RecipeError(f"mmdebstrap --mode=unshare {suite} failed ({code}):\n{output}")
    if failure is not None:
        raise RecipeError(f"mmdebstrap --mode=unshare {suite}: cannot extract its tar: {failure}")


def _copier(source: Path, to: str) -> Callable[[Path], None]:
    def copy(tmp: Path) -> None:
        dest = tmp / "layer" / to.lstrip("/")
        dest.parent.mkdir(parents=True)
        if source.is_dir():
            shutil.copytree(source, dest, symlinks=True)
        else:
            shutil.copy2(source, dest)

    return copy


def _runner(
    lowers: tuple[str, ...], command: str, config: ImageConfig, builder: RecipeBuilder, label: str, image: str
) -> Callable[[Path], None]:
    def run(tmp: Path) -> None:
        user = resolve_user(config, lowers, image)
        env = run_environment(config, user, DEFAULT_ENV)
        workdir = config.workdir or "/"
        mapping, unmapped = _run_step_mapping(builder)
        if user is not None and not user.is_root:
            last = subids.MAPPED_IDS
            if mapping is None:
                reason = USER_NOT_MAPPED.format(user=user.spec, uid=user.uid, gid=user.gid, reason=unmapped)
                raise RecipeError(f"run {command!r}: {reason}")
            if max(user.uid, user.gid, *user.groups) > last:
                reason = USER_OUT_OF_RANGE.format(user=user.spec, uid=user.uid, gid=user.gid, last=last)
                raise RecipeError(f"run {command!r}: {reason}")

        def follower(log_path: Path) -> OutputFollower:
            return OutputFollower(log_path, label, builder.progress, lines=builder.output_lines)

        try:
            _run_in_sandbox(tmp, lowers, command, env, workdir, builder.cache, mapping, unmapped, follower, user)
        except BaseException:
            if mapping is not None:  # also after a failure: the caller must be able to remove tmp
                try:
                    _give_tree_to_caller(tmp, mapping)
                except RecipeError as exc:
                    log.warning("nsbox: %s", exc)
            raise
        if mapping is not None:
            _give_tree_to_caller(tmp, mapping)
        shutil.rmtree(tmp / "work", ignore_errors=True)

    return run


def _run_step_mapping(builder: RecipeBuilder) -> tuple[subids.IdMapping | None, str]:
    """(the full id mapping for a run step, or None and why not); as root an identity mapping."""
    if os.geteuid() == 0:
        return subids.root_mapping(), ""  # ids 0..65536 inside are the same ids outside
    try:
        return builder.id_mapping(), ""
    except subids.SubordinateIdError as exc:
        log.debug("nsbox: run step with only uid %d mapped: %s", os.getuid(), exc)
        return None, str(exc)


def _give_tree_to_caller(tree: Path, mapping: subids.IdMapping) -> None:
    """Files that the step gave other owners belong to subordinate ids on disk, which neither a
    test's sandbox (it maps only root) nor the caller (nsbox images prune) could change: give
    everything to root of a mapped user namespace, which is the caller on disk."""
    try:
        subids.run_mapped(mapping, lambda: subids.chown_tree_to_root(tree))
    except RuntimeError as exc:
        raise RecipeError(f"cannot give the files of {tree} back to uid {mapping.uid}: {exc}") from None


def _run_in_sandbox(
    tmp: Path,
    lowers: tuple[str, ...],
    command: str,
    env: dict[str, str],
    workdir: str,
    cache_dir: Path,
    mapping: subids.IdMapping | None,
    unmapped: str,
    follower: Callable[[Path], OutputFollower],
    user: ImageUser | None = None,
) -> None:
    upper, work = tmp / "layer", tmp / "work"
    upper.mkdir()
    work.mkdir()
    log_path = tmp / "output.log"
    with mounts.scratch_dir() as scratch:
        plan = mounts.build_plan(
            image=lowers,
            network="host",
            scratch=scratch,
            host_paths=[],
            mounts=mounts.MountTable.read(),
            stacks_dir=str(cache.stacks_dir(cache_dir)),
            fresh_var_tmp=False,
        )
        steps = tuple(
            replace(s, upper=str(upper), work=str(work))
            if isinstance(s, mounts.MountOverlay) and s.source == mounts.ROOT_SOURCE
            else s
            for s in plan.steps
        )
        config = SandboxConfig.create(replace(plan, steps=steps), "host", "/", id_mapping=mapping)
        with open(log_path, "wb") as log_file:
            log_fd = log_file.fileno()

            def target(_channel: Channel) -> None:
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                os.makedirs(workdir, exist_ok=True)  # as Docker's WORKDIR: created (by root) if missing
                os.chdir(workdir)
                if user is not None and not user.is_root:
                    become(user)
                os.execve("/bin/sh", ["/bin/sh", "-c", command], env)

            following = follower(log_path)
            try:
                result = run_once(config, target, while_running=following.start)
            finally:
                following.stop()
    output = log_path.read_text(errors="replace")[-OUTPUT_TAIL:]
    if result.setup_error is not None:
        raise RecipeError(
            f"run {command!r}: the build sandbox failed at {result.setup_error['step']}: {result.setup_error['message']}"
        )
    status = result.test_status
    if status is None or os.waitstatus_to_exitcode(status) != 0:
        code = "no status" if status is None else os.waitstatus_to_exitcode(status)
        errors = [str(r.get("traceback", "")).strip().splitlines()[-1:] for r in result.records if r["kind"] == "internal_error"]
        detail = "; ".join(line for lines in errors for line in lines)  # e.g. no /bin/sh in the image
        note = "\n" + SINGLE_UID_NOTE.format(reason=unmapped) if unmapped else ""
        raise RecipeError(f"run {command!r} failed ({code}{': ' + detail if detail else ''}):\n{output}{note}")
