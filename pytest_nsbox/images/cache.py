"""The layer cache: content-addressed layer directories, published once under a lock, and removal.

``<cache>/layers/sha256/<hex>`` holds one extracted layer: keyed by the digest of an imported
layer's blob, or by the hash of a recipe step and its parent. A layer is built in a temporary
directory beside its final place and renamed into place under a ``filelock`` lock, so parallel
pytest processes and xdist workers build it once, and a build that was killed half-way is
found (its temporary directory) and redone. ``<cache>/images/`` remembers each image built or
imported (its layers), for ``nsbox images list``, ``rm`` and ``prune``, which remove only layers
no remembered image uses, and only while no run holds the cache (``InUse``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

LAYER_SUBDIR: Final = "layer"  # what a build writes inside its temporary directory
STACKS: Final = "stacks"  # numbered-symlink farms for long lowerdir lists (see box.mounts.short_lowers)
LAYER_ID: Final = re.compile(r"sha256:[0-9a-f]{64}")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-nsbox"


def layers_root(cache: Path) -> Path:
    return cache / "layers" / "sha256"


def is_layer_id(value: object) -> bool:
    """ "sha256:" and 64 lowercase hex digits: the only names a layer directory can have."""
    return isinstance(value, str) and bool(LAYER_ID.fullmatch(value))


def layer_dir(cache: Path, digest: str) -> Path:
    """The directory of the layer with *digest* ("sha256:<hex>", or a bare hex key); ValueError
    for anything else, so that no name from a record or an archive leads out of the cache."""
    hex_part = digest.rpartition(":")[2]
    if not is_layer_id(f"sha256:{hex_part}") or digest.partition(":")[0] not in ("sha256", hex_part):
        raise ValueError(f"not a layer id: {digest!r}")
    return layers_root(cache) / hex_part


def stacks_dir(cache: Path) -> Path:
    return cache / STACKS


def publish_layer(final: Path, build: Callable[[Path], None], *, interrupted: Callable[[], None]) -> Path:
    """*final*, built once: ``build(tmp)`` writes the layer to ``tmp/layer`` in a temporary
    directory beside *final*, which is renamed into place under a lock. *interrupted* is called
    for each leftover of a build that was killed (it is removed and the layer built again)."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock  # lazy: it installs fork handlers that every sandbox fork would run

    with FileLock(str(final) + ".lock"):
        if final.is_dir():
            return final
        prefix = f".tmp-{final.name[:12]}-"
        for stale in final.parent.glob(prefix + "*"):  # we hold the lock: its builder was killed
            interrupted()
            remove_tree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        try:
            build(tmp)
            os.rename(tmp / LAYER_SUBDIR, final)
        finally:
            remove_tree(tmp)
    return final


def remove_layer(path: Path) -> None:
    """Remove a published layer under its lock (no run may be building it meanwhile)."""
    from filelock import FileLock  # lazy: see publish_layer

    with FileLock(str(path) + ".lock"):
        remove_tree(path)
    Path(str(path) + ".lock").unlink(missing_ok=True)


def remove_tree(path: Path) -> None:
    """Remove a tree we built, also its directories without permissions (overlay's work/work is 0)."""
    if not path.exists():
        return
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            child = os.path.join(root, name)
            if not os.path.islink(child):
                with contextlib.suppress(OSError):
                    os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        log.warning("nsbox: could not remove %s completely", path)


def tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for file in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, file)).st_size
    return total


# --- image records: what `nsbox images` lists and what `prune` and `rm` keep ---------------------


IN_USE: Final = "in-use.lock"  # a run holds it shared while it may mount layers; prune and rm exclusively


class CacheBusy(RuntimeError):
    """A pytest run is using the cache: layers it may have mounted must not be removed now."""


@contextlib.contextmanager
def exclusive(cache: Path) -> Iterator[None]:
    """Hold the cache against every run (prune, rm); CacheBusy at once if a run is using it."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / IN_USE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = f"a pytest run is using {cache} (its sandboxes may have mounted the layers); try again after it ends"
            raise CacheBusy(message) from None
        yield


# The holder of a run's shared lock: a process of its own, so that no descriptor of the lock file
# is in pytest's process, where every sandbox would inherit it (and could unlock or write it).
_HOLDER: Final = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
except BlockingIOError:
    sys.stdout.write("waiting\\n"); sys.stdout.flush()
    fcntl.flock(fd, fcntl.LOCK_SH)
sys.stdout.write("held\\n"); sys.stdout.flush()
sys.stdin.buffer.read()  # until the run releases it or ends
"""


class InUse:
    """A run's shared hold on the cache, taken before its first image is resolved and kept
    until the run ends: ``nsbox images prune``/``rm`` refuse while a run holds it. The lock is
    held by a small process that ends when its stdin closes (also when the run is killed)."""

    def __init__(self, cache: Path, waiting: Callable[[str], None] | None = None) -> None:
        cache.mkdir(parents=True, exist_ok=True)
        self._holder = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _HOLDER, str(cache / IN_USE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self._holder.stdout is not None
        line = self._holder.stdout.readline()
        if line == b"waiting\n":
            (waiting or _say_waiting)(f"nsbox: waiting for nsbox images prune or rm to finish with {cache}")
            line = self._holder.stdout.readline()
        if line != b"held\n":
            self.release()
            raise OSError(f"cannot hold the image cache {cache} (its lock holder ended: {line!r})")

    def __enter__(self) -> InUse:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._holder.stdin is not None:
            self._holder.stdin.close()
        if self._holder.stdout is not None:
            self._holder.stdout.close()
        self._holder.wait()


def _say_waiting(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """An image the cache holds: a recipe built or an image imported, and its layers, bottom first."""

    name: str
    kind: str  # "recipe", "oci", "oci-archive", "docker-archive"
    source: str  # the recipe's image.toml, or the imported layout or archive
    layers: tuple[str, ...]  # "sha256:<hex>": a blob digest, or a recipe step's key
    history: tuple[str, ...]  # what made each layer ("run apt-get ...", a digest)
    created: float
    last_used: float
    key: str = ""  # a recipe's content key (``nsbox images key``)
    record: Path | None = None  # where the record is stored

    def size(self, cache: Path) -> int:
        return sum(tree_size(layer_dir(cache, layer)) for layer in self.layers)


def _record_path(cache: Path, name: str, path: Path) -> Path:
    key = hashlib.sha256(f"{name}\0{path.resolve()}".encode()).hexdigest()[:32]
    return cache / "images" / f"{key}.json"


def record_image(
    cache: Path,
    name: str,
    path: Path,
    layers: Sequence[str],
    *,
    kind: str,
    history: Sequence[str] = (),
    key: str = "",
) -> None:
    """Remember an image (name, source, layers bottom first, when it was made and last used);
    written atomically. *created* survives while the layers stay the same."""
    record = _record_path(cache, name, path)
    record.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    created = now
    previous = _read_record(record)
    if previous is not None and list(previous.layers) == list(layers):
        created = previous.created
    data = {
        "name": name,
        "kind": kind,
        "source": str(path.resolve()),
        "layers": list(layers),
        "history": list(history) or list(layers),
        "created": created,
        "last_used": now,
        "key": key,
    }
    fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
    os.replace(tmp, record)


def _read_record(path: Path) -> ImageRecord | None:
    try:
        data = json.loads(path.read_text())
        layers = tuple(data["layers"])
        if not all(is_layer_id(layer) for layer in layers):
            return None  # not written by us: never followed
        return ImageRecord(
            name=str(data["name"]),
            kind=str(data.get("kind", "oci")),  # records of pytest-nsbox <= 0.3 are imports
            source=str(data.get("source", "")),
            layers=layers,
            history=tuple(str(h) for h in data.get("history") or layers),
            created=float(data.get("created", data.get("last_used", 0))),
            last_used=float(data.get("last_used", 0)),
            key=str(data.get("key", "")),
            record=path,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_images(cache: Path) -> list[ImageRecord]:
    """Every image the cache remembers, by name (unreadable records are skipped)."""
    records = [r for p in sorted((cache / "images").glob("*.json")) if (r := _read_record(p)) is not None]
    return sorted(records, key=lambda r: (r.name, r.source))


def layer_ids(cache: Path) -> list[str]:
    """The published layers in the cache, as "sha256:<hex>"."""
    root = layers_root(cache)
    entries = sorted(root.iterdir()) if root.is_dir() else []
    return [f"sha256:{e.name}" for e in entries if e.is_dir() and not e.name.startswith(".")]


@dataclass(frozen=True, slots=True)
class Removal:
    """What a prune or an rm removes (or would, with --dry-run): records, layers, bytes."""

    images: tuple[ImageRecord, ...]
    layers: tuple[str, ...]
    size: int
    leftovers: tuple[Path, ...] = ()  # temporary directories of builds that were killed


def plan_removal(cache: Path, forget: Sequence[ImageRecord], *, prune: bool = False) -> Removal:
    """Forgetting *forget*: their layers no other image uses, with their size; with *prune*,
    every layer no image uses, and what interrupted builds left."""
    forgotten = {r.record for r in forget}
    keep = {layer for r in list_images(cache) if r.record not in forgotten for layer in r.layers}
    theirs = {layer for r in forget for layer in r.layers}
    unused = tuple(layer for layer in layer_ids(cache) if layer not in keep and (prune or layer in theirs))
    root = layers_root(cache)
    leftovers = tuple(sorted(root.glob(".tmp-*"))) if prune and root.is_dir() else ()
    size = sum(tree_size(layer_dir(cache, layer)) for layer in unused) + sum(tree_size(p) for p in leftovers)
    return Removal(tuple(forget), unused, size, leftovers)


def prune_plan(cache: Path, *, older_than: float | None = None) -> Removal:
    """Layers no image uses (an image not used for *older_than* seconds is forgotten first)."""
    now = time.time()
    stale = [r for r in list_images(cache) if older_than is not None and now - r.last_used > older_than]
    return plan_removal(cache, stale, prune=True)


def remove(cache: Path, removal: Removal) -> None:
    """Carry out *removal*; hold ``exclusive(cache)`` meanwhile."""
    for record in removal.images:
        if record.record is not None:
            record.record.unlink(missing_ok=True)
    for layer in removal.layers:
        remove_layer(layer_dir(cache, layer))
    for leftover in removal.leftovers:
        remove_tree(leftover)
    shutil.rmtree(stacks_dir(cache), ignore_errors=True)  # rebuilt on demand
