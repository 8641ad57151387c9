"""``nsbox images save`` and ``load``: images of the cache as one portable tar file.

A CI cache (GitHub's actions/cache, GitLab's cache) archives files with a plain ``tar`` and restores
them as an ordinary user: overlay whiteouts (0/0 character devices) cannot be created that way, and
the ``user.overlay.opaque`` attribute of opaque directories is dropped. So the cache directory
itself is not what a CI should keep; this file is. Each layer is written as an OCI layer tar
(a whiteout is a ``.wh.NAME`` file, an opaque directory has ``.wh..wh..opq``, ``user.*`` attributes
are PAX ``SCHILY.xattr`` records) and read back by the same checked extractor as an imported image,
under the layer's own key, so a recipe finds its layers and builds nothing.

```
nsbox-images.json            {"format": 1, "images": [record, ...], "layers": {id: {"sha256", "mode"}}}
layers/<hex>.tar             one layer, OCI whiteouts
```
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Final

from . import cache
from .errors import ImageImportError
from .extract import OPAQUE_XATTR

INDEX: Final = "nsbox-images.json"
FORMAT: Final = 1
WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"


def _xattrs(path: str) -> dict[str, str]:
    """The ``user.*`` attributes of *path* as PAX records (overlay's own markers excluded)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    records = {}
    for name in names:
        if name.startswith("user.") and not name.startswith("user.overlay."):
            value = os.getxattr(path, name, follow_symlinks=False)
            records[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
    return records


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _unreadable(exc: OSError) -> None:
    raise exc  # a directory that cannot be listed must not be left out silently


def pack_layer(root: Path, out: IO[bytes]) -> None:
    """Write the layer directory *root* (an overlay upper layer) to *out* as an OCI layer tar."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for directory, dirnames, filenames in os.walk(root, onerror=_unreadable):
            dirnames.sort()
            relative = os.path.relpath(directory, root)
            prefix = "" if relative == "." else relative + "/"
            if prefix and _is_opaque(directory):
                archive.addfile(_marker(prefix + OPAQUE_MARKER))
            for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(directory, d))]):
                _add(archive, os.path.join(directory, name), prefix + name)
            for name in dirnames:
                path = os.path.join(directory, name)
                if not os.path.islink(path):
                    _add(archive, path, prefix + name)


def _marker(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    return info


def _add(archive: tarfile.TarFile, path: str, name: str) -> None:
    status = os.lstat(path)
    if stat.S_ISCHR(status.st_mode) and status.st_rdev == 0:  # overlay's whiteout
        parent, _, base = name.rpartition("/")
        archive.addfile(_marker(f"{parent}/{WHITEOUT_PREFIX}{base}" if parent else WHITEOUT_PREFIX + base))
        return
    if not (stat.S_ISREG(status.st_mode) or stat.S_ISDIR(status.st_mode) or stat.S_ISLNK(status.st_mode)):
        return  # devices, fifos, sockets: a sandbox has its own /dev, and the extractor creates none
    info = archive.gettarinfo(path, name)
    info.pax_headers = _xattrs(path)
    if info.isreg():
        with open(path, "rb") as handle:
            archive.addfile(info, handle)
    else:
        archive.addfile(info)


def _pack_in_child(directory: Path, out: IO[bytes], what: str) -> None:
    """pack_layer in a forked child: rootless in a user namespace of its own, where root (the
    caller) may read the caller's files whatever their mode (an image's 0000 /etc/shadow)."""
    from ..box import _linux as L
    from ..box.child import describe_exception, run_in_child
    from ..box.steps import write_id_maps

    as_root = os.geteuid() == 0

    def pack() -> None:
        if not as_root:
            uid, gid = os.getuid(), os.getgid()
            L.unshare(L.CLONE_NEWUSER)
            write_id_maps(uid, gid)
        with os.fdopen(os.dup(out.fileno()), "wb") as handle:
            pack_layer(directory, handle)

    problem = run_in_child(pack, describe_exception)
    if problem:
        raise ImageImportError(f"{what} cannot be saved: {problem}")


def save(cache_dir: Path, records: Sequence[cache.ImageRecord], out: Path) -> int:
    """Write *records* and their layers to the file *out* (atomically); return its size."""
    layers: dict[str, dict[str, Any]] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "wb") as handle, tarfile.open(fileobj=handle, mode="w|", format=tarfile.PAX_FORMAT) as archive:
            for record in records:
                for layer in record.layers:
                    if layer in layers:
                        continue
                    directory = cache.layer_dir(cache_dir, layer)
                    if not directory.is_dir():
                        raise ImageImportError(f"image {record.name!r}: layer {layer} is missing from {cache_dir}")
                    with tempfile.TemporaryFile() as packed:
                        _pack_in_child(directory, packed, f"image {record.name!r}: layer {layer}")
                        packed.seek(0, os.SEEK_END)
                        size = packed.tell()
                        packed.seek(0)
                        digest = hashlib.sha256()
                        for chunk in iter(lambda: packed.read(1 << 20), b""):
                            digest.update(chunk)
                        packed.seek(0)
                        info = tarfile.TarInfo(f"layers/{layer.rpartition(':')[2]}.tar")
                        info.size = size
                        archive.addfile(info, packed)
                    layers[layer] = {"sha256": digest.hexdigest(), "mode": stat.S_IMODE(os.stat(directory).st_mode)}
            index = json.dumps({"format": FORMAT, "images": [_as_dict(r) for r in records], "layers": layers}).encode()
            info = tarfile.TarInfo(INDEX)
            info.size = len(index)
            archive.addfile(info, io.BytesIO(index))
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out.stat().st_size


def _as_dict(record: cache.ImageRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "kind": record.kind,
        "source": record.source,
        "layers": list(record.layers),
        "history": list(record.history),
        "key": record.key,
    }


def _checked_index(data: bytes, what: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The index's layers and images, every field of the expected type; ImageImportError else."""
    index = json.loads(data)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise ImageImportError(f"{what}: {INDEX} has format {found!r}, expected {FORMAT}")
    layers, images = index.get("layers"), index.get("images")
    if not isinstance(layers, dict) or not isinstance(images, list):
        raise ImageImportError(f"{what}: {INDEX} must hold 'layers' (an object) and 'images' (a list)")
    for layer, about in layers.items():
        if not cache.is_layer_id(layer):
            raise ImageImportError(f"{what}: bad layer id {layer!r}")
        if not (isinstance(about, dict) and isinstance(about.get("sha256"), str) and type(about.get("mode", 0)) is int):
            raise ImageImportError(f"{what}: layer {layer}: expected {{'sha256': HEX, 'mode': INT}}")
    for number, image in enumerate(images, 1):
        fields = ("name", "kind", "source", "key")
        if not isinstance(image, dict) or not all(isinstance(image.get(f, ""), str) for f in fields):
            raise ImageImportError(f"{what}: image {number}: expected strings for {', '.join(fields)}")
        if not image.get("name") or not isinstance(image.get("layers"), list) or not isinstance(image.get("history", []), list):
            raise ImageImportError(f"{what}: image {number}: expected a name, 'layers' and 'history' lists")
        for layer in image["layers"]:
            if layer not in layers:  # a record names only layers this file carries (and checks)
                raise ImageImportError(f"{what}: image {image['name']!r} names layer {layer!r}, which the file does not hold")
    return layers, images


def load(cache_dir: Path, source: Path) -> tuple[list[str], int]:
    """Put the images of the file *source* into the cache: (their names, the layers extracted).

    Layers the cache has are kept; each new one is extracted by the same checked extractor as an
    imported image (nothing lands outside its layer directory, no device node is made). The file
    says which key each layer is published under and what its digest is: loading one is trusting
    it like code you run (a layer it carries is what a recipe of that key then runs on).
    """
    from . import oci  # lazy: oci imports this package's cache too

    what = f"image archive {source}"
    try:
        size = source.stat().st_size
        with tarfile.open(source, mode="r:") as archive:
            members = {m.name: m for m in archive.getmembers() if m.isfile()}
            if INDEX not in members:
                raise ImageImportError(f"{what}: no {INDEX} (not written by nsbox images save)")
            layer_info, images = _checked_index(_read(archive, members[INDEX], size), what)
            extracted = 0
            for layer, about in layer_info.items():
                final = cache.layer_dir(cache_dir, layer)
                if final.is_dir():
                    continue
                member = members.get(f"layers/{layer.partition(':')[2]}.tar")
                if member is None:
                    raise ImageImportError(f"{what}: layer {layer} is missing")
                data = _read(archive, member, size)
                blob = oci.Layer(f"sha256:{about['sha256']}", lambda data=data: io.BytesIO(data))
                mode = int(about.get("mode", 0o755)) & 0o755  # no group/world write, no setuid on a layer's root

                def build(tmp: Path, blob: oci.Layer = blob, mode: int = mode, layer: str = layer) -> None:
                    (tmp / cache.LAYER_SUBDIR).mkdir(mode=0o700)
                    oci.extract_in_child(blob, tmp / cache.LAYER_SUBDIR, f"{what}: layer {layer}")
                    os.chmod(tmp / cache.LAYER_SUBDIR, mode)

                cache.publish_layer(final, build, interrupted=lambda: None)
                extracted += 1
            for image in images:
                cache.record_image(
                    cache_dir,
                    image["name"],
                    Path(image["source"] or "/nonexistent"),
                    image["layers"],
                    kind=image["kind"] or "recipe",
                    history=[str(h) for h in image.get("history", [])],
                    key=image.get("key", ""),
                )
    except (OSError, tarfile.TarError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ImageImportError(f"{what}: {type(exc).__name__}: {exc}") from None
    return [str(image["name"]) for image in images], extracted


def _read(archive: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    """A member's content (read whole: an extractor checks its digest first); one that claims
    more than the file holds, or is sparse, is refused."""
    if member.issparse() or member.size > limit:
        raise ImageImportError(f"{member.name}: {member.size} bytes claimed in a file of {limit}")
    handle = archive.extractfile(member)
    if handle is None:
        raise ImageImportError(f"{member.name} cannot be read")
    return handle.read()
