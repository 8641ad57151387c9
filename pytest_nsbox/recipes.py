"""Image recipes: ``rootfs_images/<name>/image.toml``, a base plus steps, each step one cached layer.

```toml
[base]                      # exactly one of:
debian = "bookworm"         #   mmdebstrap minbase, merged-usr, no docs or locales (root only)
# busybox = true            #   the static busybox of the host (package busybox-static)
# scratch = true            #   nothing
# image = "oci-archive:app.tar"   # an imported image
# recipe = "debian-bookworm"      # another recipe

[[steps]]
run = "apt-get -o APT::Sandbox::User=root install -y --no-install-recommends curl"
[[steps]]
copy = { from = "files/motd", to = "/etc/motd" }
[[steps]]
env = { LANG = "C.UTF-8" }        # for the run steps after it
```

A layer's key is the hash of its parent's key and its own definition (plus the content of the
files a ``copy`` step takes), so changing step 3 rebuilds from step 3 on, like a Dockerfile. A
``run`` step runs ``/bin/sh -c`` in a sandbox over the layers so far (network "host"), and its
writable layer, whiteouts included, becomes the step's layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from . import mounts, oci, sandbox

RECIPE_FILE: Final = "image.toml"
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


class RecipeError(Exception):
    """A recipe is invalid or its build failed; the message names the file and the field or step."""


@dataclass(frozen=True, slots=True)
class Recipe:
    name: str
    path: Path  # the image.toml
    base: tuple[str, Any]
    steps: tuple[dict[str, Any], ...]

    @property
    def dir(self) -> Path:
        return self.path.parent


def search_dirs(rootdir: Path, extra: Sequence[str]) -> list[Path]:
    """Recipe folders: the ini's nsbox_image_dirs (relative to the rootdir), then rootfs_images/."""
    dirs = [Path(d) if os.path.isabs(d) else rootdir / d for d in extra]
    return [*dirs, rootdir / "rootfs_images"]


def known_images(dirs: Sequence[Path]) -> list[str]:
    names: set[str] = set()
    for folder in dirs:
        if folder.is_dir():
            names.update(p.parent.name for p in folder.glob(f"*/{RECIPE_FILE}"))
    return sorted(names)


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
        if step_kind == "env" and not (isinstance(argument, dict) and all(isinstance(v, str) for v in argument.values())):
            raise RecipeError(f"{where}.env must be a table of strings")
        if step_kind == "copy":
            if not (isinstance(argument, dict) and set(argument) == {"from", "to"} and str(argument["to"]).startswith("/")):
                raise RecipeError(f"{where}.copy must be {{ from = 'relative/path', to = '/absolute/path' }}")
            source = (path.parent / str(argument["from"])).resolve()
            if not source.is_relative_to(path.parent.resolve()) or not source.exists():
                raise RecipeError(f"{where}.copy.from {argument['from']!r}: no such file in {path.parent}")
    return Recipe(path.parent.name, path, (kind, value), tuple(steps))


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


@dataclass
class Builder:
    """Builds recipes into cached layers; *progress* gets one line per step that is built."""

    cache: Path
    dirs: Sequence[Path]
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)

    def build(self, recipe: Recipe, _seen: tuple[str, ...] = ()) -> list[str]:
        """The recipe's layer directories, bottom first, building what is not cached."""
        if recipe.name in _seen:
            raise RecipeError(f"{recipe.path}: base recipe cycle {' -> '.join((*_seen, recipe.name))}")
        kind, value = recipe.base
        total = 1 + len(recipe.steps)
        if kind == "recipe":
            parent = find(str(value), self.dirs)
            if parent is None:
                raise RecipeError(f"{recipe.path}: base.recipe {value!r} not found in {[str(d) for d in self.dirs]}")
            layers = self.build(parent, (*_seen, recipe.name))
            key = _key("recipe", layers)
        elif kind == "image":
            layers = oci.import_image(str(value), recipe.dir, self.cache)[::-1]
            key = _key("image", layers)
        else:
            key = _key(kind, value, _tool_identity(kind))
            layers = [self._layer(key, recipe, 1, total, f"{kind} {value}", lambda dest: _build_base(kind, value, dest))]
        env = dict(DEFAULT_ENV)
        workdir = "/"
        for number, step in enumerate(recipe.steps, 2):
            step_kind, argument = next(iter(step.items()))
            if step_kind == "env":
                env.update(argument)
                continue
            if step_kind == "workdir":
                workdir = argument
                continue
            if step_kind == "copy":
                source = recipe.dir / argument["from"]
                key = _key(key, step, _tree_hash(source))
                layers.append(
                    self._layer(
                        key,
                        recipe,
                        number,
                        total,
                        f"copy {argument['from']} -> {argument['to']}",
                        _copier(source, argument["to"]),
                    )
                )
            else:
                key = _key(key, step, env, workdir)
                lowers = tuple(layers[::-1])
                build = _runner(lowers, argument, env, workdir, self.cache)
                layers.append(self._layer(key, recipe, number, total, f"run {argument}", build))
        return layers

    def _layer(self, key: str, recipe: Recipe, number: int, total: int, what: str, build: Callable[[Path], None]) -> str:
        final = self.cache / "layers" / "sha256" / key
        if final.is_dir():
            return str(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock  # lazy: it installs fork handlers that every sandbox fork would run
        with FileLock(str(final) + ".lock"):
            if final.is_dir():
                return str(final)
            for stale in final.parent.glob(f".tmp-{key[:12]}-*"):
                self.progress(f"nsbox: {recipe.name}: step {number}/{total} was interrupted before; building it again")
                oci._remove_tree(stale)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=final.parent))
            start = time.monotonic()
            self.progress(f"nsbox: building image {recipe.name}: step {number}/{total}: {what}")
            try:
                build(tmp)
                os.rename(tmp / "layer", final)
            except BaseException:
                oci._remove_tree(tmp)
                raise
            oci._remove_tree(tmp)
            self.progress(f"nsbox: building image {recipe.name}: step {number}/{total} done in {time.monotonic() - start:.1f}s")
        return str(final)


def _tool_identity(kind: str) -> str:
    if kind == "busybox":
        try:
            return hashlib.sha256(Path(BUSYBOX).read_bytes()).hexdigest()
        except OSError:
            return "missing"
    return ""


def _build_base(kind: str, value: Any, tmp: Path) -> None:
    layer = tmp / "layer"
    if kind == "scratch":
        layer.mkdir()
    elif kind == "busybox":
        _build_busybox(layer)
    elif kind == "debian":
        _build_debian(str(value), layer)


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


def debian_command(suite: str, target: Path) -> list[str]:
    """The mmdebstrap call of a debian base: minbase, merged-usr, no docs, man pages or locales."""
    return [
        "mmdebstrap",
        "--quiet",
        "--mode=root",
        "--variant=minbase",
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        *[f"--dpkgopt={option}" for option in DEBIAN_EXCLUDES],
        suite,
        str(target),
    ]


def _build_debian(suite: str, layer: Path) -> None:
    if shutil.which("mmdebstrap") is None:
        raise RecipeError("base debian needs mmdebstrap (apt install mmdebstrap)")
    if os.geteuid() != 0:
        raise RecipeError(
            "base debian needs root here: mmdebstrap --mode=unshare makes a tree owned by subordinate uids, "
            "which a sandbox that maps only your uid cannot write"
        )
    proc = subprocess.run(debian_command(suite, layer), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RecipeError(f"mmdebstrap {suite} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def _copier(source: Path, to: str) -> Callable[[Path], None]:
    def copy(tmp: Path) -> None:
        dest = tmp / "layer" / to.lstrip("/")
        dest.parent.mkdir(parents=True)
        if source.is_dir():
            shutil.copytree(source, dest, symlinks=True)
        else:
            shutil.copy2(source, dest)

    return copy


def _runner(lowers: tuple[str, ...], command: str, env: dict[str, str], workdir: str, cache: Path) -> Callable[[Path], None]:
    def run(tmp: Path) -> None:
        upper, work = tmp / "layer", tmp / "work"
        upper.mkdir()
        work.mkdir()
        scratch = tempfile.mkdtemp(prefix=f"pytest-nsbox-{os.getpid()}-")
        log_path = tmp / "output.log"
        try:
            plan = mounts.build_plan(
                image=lowers,
                network="host",
                scratch=scratch,
                host_paths=[],
                mounts=mounts.MountTable.read(),
                host_resolv_conf=_read("/etc/resolv.conf"),
                stacks_dir=str(cache / "stacks"),
            )
            steps = tuple(
                replace(s, upper=str(upper), work=str(work))
                if isinstance(s, mounts.MountOverlay) and s.source == mounts.ROOT_SOURCE
                else s
                for s in plan.steps
            )
            config = sandbox.SandboxConfig(
                replace(plan, steps=steps),
                "host",
                os.getuid(),
                os.getgid(),
                sandbox.namespace_ids(),
                workdir,
                sandbox.read_cap_last_cap(),
            )
            with open(log_path, "wb") as log:
                log_fd = log.fileno()

                def target(_channel: sandbox.Channel) -> None:
                    os.dup2(log_fd, 1)
                    os.dup2(log_fd, 2)
                    os.chdir(workdir)
                    os.execve("/bin/sh", ["/bin/sh", "-c", command], env)

                result = sandbox.run(config, target)
                sandbox.reap_finished(block=True)
        finally:
            os.rmdir(scratch)
        output = log_path.read_text(errors="replace")[-4000:]
        if result.setup_error is not None:
            raise RecipeError(
                f"run {command!r}: the build sandbox failed at {result.setup_error['step']}: {result.setup_error['message']}"
            )
        status = result.test_status
        if status is None or os.waitstatus_to_exitcode(status) != 0:
            code = "no status" if status is None else os.waitstatus_to_exitcode(status)
            errors = [
                str(r.get("traceback", "")).strip().splitlines()[-1:] for r in result.records if r["kind"] == "internal_error"
            ]
            detail = "; ".join(line for lines in errors for line in lines)  # e.g. no /bin/sh in the image
            raise RecipeError(f"run {command!r} failed ({code}{': ' + detail if detail else ''}):\n{output}")
        shutil.rmtree(work, ignore_errors=True)

    return run


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
