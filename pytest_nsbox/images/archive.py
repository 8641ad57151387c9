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


def pack_layer(root: Path, out: IO[bytes]) -> None:
    """Write the layer directory *root* (an overlay upper layer) to *out* as an OCI layer tar."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for directory, dirnames, filenames in os.walk(root):
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
                        pack_layer(directory, packed)
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


def load(cache_dir: Path, source: Path) -> tuple[list[str], int]:
    """Put the images of the file *source* into the cache: (their names, the layers extracted).
    Layers the cache has are kept; each new one is checked against its digest and extracted by
    the same checked extractor as an imported image."""
    from . import oci  # lazy: oci imports this package's cache too

    what = f"image archive {source}"
    try:
        with tarfile.open(source, mode="r:") as archive:
            members = {m.name: m for m in archive.getmembers() if m.isfile()}
            if INDEX not in members:
                raise ImageImportError(f"{what}: no {INDEX} (not written by nsbox images save)")
            index = json.loads(_read(archive, members[INDEX]))
            if index.get("format") != FORMAT:
                raise ImageImportError(f"{what}: format {index.get('format')!r}, expected {FORMAT}")
            layer_info: dict[str, Any] = index["layers"]
            images: list[dict[str, Any]] = index["images"]
            extracted = 0
            for layer, about in layer_info.items():
                hex_id = str(layer).rpartition(":")[2]
                if not (len(hex_id) == 64 and all(c in "0123456789abcdef" for c in hex_id)):
                    raise ImageImportError(f"{what}: bad layer id {layer!r}")
                final = cache.layer_dir(cache_dir, hex_id)
                if final.is_dir():
                    continue
                member = members.get(f"layers/{hex_id}.tar")
                if member is None:
                    raise ImageImportError(f"{what}: layer {layer} is missing")
                data = _read(archive, member)
                blob = oci.Layer(f"sha256:{about['sha256']}", lambda data=data: io.BytesIO(data))
                mode = int(about.get("mode", 0o755)) & 0o7777

                def build(tmp: Path, blob: oci.Layer = blob, mode: int = mode, layer: str = layer) -> None:
                    (tmp / cache.LAYER_SUBDIR).mkdir(mode=0o700)
                    oci.extract_in_child(blob, tmp / cache.LAYER_SUBDIR, f"{what}: layer {layer}")
                    os.chmod(tmp / cache.LAYER_SUBDIR, mode)

                cache.publish_layer(final, build, interrupted=lambda: None)
                extracted += 1
            for image in images:
                cache.record_image(
                    cache_dir,
                    str(image["name"]),
                    Path(str(image["source"])),
                    [str(layer) for layer in image["layers"]],
                    kind=str(image["kind"]),
                    history=[str(h) for h in image.get("history", [])],
                    key=str(image.get("key", "")),
                )
    except (OSError, tarfile.TarError, ValueError, KeyError, TypeError) as exc:
        raise ImageImportError(f"{what}: {type(exc).__name__}: {exc}") from None
    return [str(image["name"]) for image in images], extracted


def _read(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    if handle is None:
        raise ImageImportError(f"{member.name} cannot be read")
    return handle.read()
