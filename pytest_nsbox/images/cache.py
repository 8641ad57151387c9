"""The layer cache: content-addressed layer directories, published once under a lock, and removal.

``<cache>/layers/sha256/<hex>`` holds one extracted layer: keyed by the digest of an imported
layer's blob, or by the hash of a recipe step and its parent. A layer is built in a temporary
directory beside its final place and renamed into place under a ``filelock`` lock, so parallel
pytest processes and xdist workers build it once, and a build that was killed half-way is
found (its temporary directory) and redone. ``<cache>/images/`` remembers imported images for
``nsbox images list`` and ``prune``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

LAYER_SUBDIR: Final = "layer"  # what a build writes inside its temporary directory
STACKS: Final = "stacks"  # numbered-symlink farms for long lowerdir lists (see box.mounts.short_lowers)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-nsbox"


def layers_root(cache: Path) -> Path:
    return cache / "layers" / "sha256"


def layer_dir(cache: Path, digest: str) -> Path:
    """The directory of the layer with *digest* ("sha256:<hex>", or a bare hex key)."""
    return layers_root(cache) / digest.rpartition(":")[2]


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


# --- image records: what `nsbox images` lists and what `prune` keeps ---------------------------


def _record_path(cache: Path, name: str, path: Path) -> Path:
    key = hashlib.sha256(f"{name}\0{path.resolve()}".encode()).hexdigest()[:32]
    return cache / "images" / f"{key}.json"


def record_image(cache: Path, name: str, path: Path, digests: list[str]) -> None:
    """Remember an imported image (reference, source, layers, last use); written atomically."""
    record = _record_path(cache, name, path)
    record.parent.mkdir(parents=True, exist_ok=True)
    data = {"name": name, "source": str(path.resolve()), "layers": digests, "last_used": time.time()}
    fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
    os.replace(tmp, record)


def list_images(cache: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted((cache / "images").glob("*.json")):
        try:
            records.append(json.loads(path.read_text()) | {"record": str(path)})
        except (OSError, ValueError):
            continue
    return records


def prune(cache: Path, *, older_than: float | None = None) -> list[str]:
    """Forget images not used for *older_than* seconds (if given), then remove every layer no
    remaining image uses; return the removed layer digests."""
    now = time.time()
    keep: set[str] = set()
    for record in list_images(cache):
        if older_than is not None and now - float(record.get("last_used", 0)) > older_than:
            Path(record["record"]).unlink(missing_ok=True)
            continue
        keep.update(record.get("layers") or [])
    removed = []
    root = layers_root(cache)
    for entry in sorted(root.glob("*")) if root.is_dir() else []:
        if entry.is_dir() and not entry.name.startswith(".") and f"sha256:{entry.name}" not in keep:
            remove_layer(entry)
            removed.append(f"sha256:{entry.name}")
    shutil.rmtree(stacks_dir(cache), ignore_errors=True)  # rebuilt on demand
    return removed
