"""Import OCI image layouts, oci-archives and docker-save archives into the layer cache.

Each layer blob is checked against its digest and extracted once (``extract.py``, in a child
that cannot harm this process) into ``<cache>/layers/sha256/<hex>``, published atomically under
a lock (``cache.publish_layer``), so parallel pytest processes and xdist workers extract it once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..box import _linux as L
from ..box.child import describe_exception, run_in_child
from ..box.steps import write_id_maps
from . import cache
from .config import ImageConfig, parse_image_config, resolve_user
from .errors import ImageImportError
from .extract import DecompressionError, RefusedMember, decompressing, extract_layer

log = logging.getLogger(__name__)

PREFIXES: Final = ("oci:", "oci-archive:", "docker-archive:")
MAX_LAYERS: Final = 499  # overlayfs takes 500 lower layers; one is the init layer
REF_NAME: Final = "org.opencontainers.image.ref.name"
SPOOL_CHUNK: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class Layer:
    digest: str  # "sha256:<hex>" of the blob as stored
    open: Any  # () -> binary file object of the blob


# --- references ------------------------------------------------------------------------------


def is_reference(name: str) -> bool:
    return name.startswith(PREFIXES)


def parse_reference(name: str, base: Path) -> tuple[str, Path, str | None]:
    """("oci" | "oci-archive" | "docker-archive", path, tag) for an image reference."""
    kind, _, rest = name.partition(":")
    tag: str | None = None
    if kind != "docker-archive" and ":" in rest:
        rest, _, tag = rest.rpartition(":")
    if not rest:
        raise ImageImportError(f"image {name!r}: no path after {kind}:")
    path = Path(rest) if os.path.isabs(rest) else base / rest
    return kind, path, tag or None


# --- reading layouts and archives ------------------------------------------------------------


def _blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
        raise ImageImportError(f"unsupported or malformed digest {digest!r}")
    return layout / "blobs" / algorithm / hexdigest


def _select_manifest(index: dict[str, Any], tag: str | None, name: str, read: Any) -> dict[str, Any]:
    manifests = index.get("manifests") or []
    if tag is not None:
        manifests = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) == tag]
        if not manifests:
            raise ImageImportError(f"image {name!r}: no manifest tagged {tag!r}")
    if len(manifests) != 1:
        names = [(m.get("annotations") or {}).get(REF_NAME, m.get("digest")) for m in index.get("manifests") or []]
        raise ImageImportError(f"image {name!r}: {len(manifests)} manifests match; name one with :TAG (have {names})")
    descriptor = manifests[0]
    document = json.loads(read(descriptor["digest"]))
    if "manifests" in document:  # an image index: take linux/amd64 (or the only one)
        candidates = [
            m
            for m in document["manifests"]
            if (m.get("platform") or {}).get("os", "linux") == "linux"
            and (m.get("platform") or {}).get("architecture", "amd64") in ("amd64", "x86_64")
        ]
        if not candidates:
            raise ImageImportError(f"image {name!r}: no linux/amd64 manifest in its index")
        document = json.loads(read(candidates[0]["digest"]))
    return document  # type: ignore[no-any-return]


def _verified(data: bytes, digest: str, name: str) -> bytes:
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise ImageImportError(f"image {name!r}: blob {digest} is corrupt (its content hashes to {actual})")
    return data


def oci_layers(kind: str, path: Path, tag: str | None, name: str) -> tuple[list[Layer], ImageConfig]:
    """The layers of an OCI layout directory or oci-archive, bottom first, and its config."""
    if kind == "oci":
        if not (path / "index.json").is_file():
            raise ImageImportError(f"image {name!r}: {path} is not an OCI image layout (no index.json)")

        def read(digest: str) -> bytes:
            return _verified(_blob_path(path, digest).read_bytes(), digest, name)

        def opener(digest: str) -> Any:
            return lambda: open(_blob_path(path, digest), "rb")

        index = json.loads((path / "index.json").read_text())
    else:
        archive = _open_archive(path, name)

        members = {m.name.removeprefix("./"): m for m in archive.getmembers()}

        def member_bytes(member: str) -> bytes:
            info = members.get(member)
            handle = archive.extractfile(info) if info is not None else None
            if handle is None:
                raise ImageImportError(f"image {name!r}: {member} is missing from {path}")
            return handle.read()

        def blob_member(digest: str) -> str:
            return str(_blob_path(Path("/"), digest))[1:]

        def read(digest: str) -> bytes:
            return _verified(member_bytes(blob_member(digest)), digest, name)

        def opener(digest: str) -> Any:
            member = blob_member(digest)
            return lambda: io.BytesIO(member_bytes(member))

        index = json.loads(member_bytes("index.json"))
    manifest = _select_manifest(index, tag, name, read)
    layers = [Layer(d["digest"], opener(d["digest"])) for d in manifest.get("layers") or []]
    descriptor = manifest.get("config")
    config = parse_image_config(json.loads(read(descriptor["digest"])), name) if descriptor else ImageConfig()
    return layers, config


def _open_archive(path: Path, name: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")
    except (OSError, tarfile.TarError) as exc:
        raise ImageImportError(f"image {name!r}: cannot read archive {path}: {exc}") from None


def docker_layers(path: Path, name: str) -> tuple[list[Layer], ImageConfig]:
    """The layers of a ``docker save`` archive (legacy layout and the OCI-hybrid one), bottom
    first, and its config (the manifest's ``Config`` file)."""
    archive = _open_archive(path, name)
    members = {m.name.removeprefix("./"): m for m in archive.getmembers()}
    handle = archive.extractfile(members["manifest.json"]) if "manifest.json" in members else None
    if handle is None:
        raise ImageImportError(f"image {name!r}: {path} has no manifest.json (not a docker-save archive)")
    manifest = json.loads(handle.read())
    if len(manifest) != 1:
        raise ImageImportError(f"image {name!r}: {path} holds {len(manifest)} images; one is supported")
    layers = []
    for member in manifest[0].get("Layers") or []:
        info = members.get(str(member).removeprefix("./"))
        data_handle = archive.extractfile(info) if info is not None else None
        if data_handle is None:
            raise ImageImportError(f"image {name!r}: layer {member} missing from {path}")
        data = data_handle.read()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        layers.append(Layer(digest, (lambda d=data: io.BytesIO(d))))
    config = ImageConfig()
    if manifest[0].get("Config"):
        info = members.get(str(manifest[0]["Config"]).removeprefix("./"))
        config_handle = archive.extractfile(info) if info is not None else None
        if config_handle is None:
            raise ImageImportError(f"image {name!r}: config {manifest[0]['Config']} missing from {path}")
        config = parse_image_config(json.loads(config_handle.read()), name)
    return layers, config


def ensure_layer(cache_dir: Path, layer: Layer, name: str) -> Path:
    """The extracted layer, built once (atomically, under a lock) if it is not cached yet."""

    def interrupted() -> None:
        log.warning("nsbox: layer %s of image %r: a previous import was interrupted; importing it again", layer.digest, name)

    def build(tmp: Path) -> None:
        (tmp / cache.LAYER_SUBDIR).mkdir(mode=0o700)  # the image's own root entry decides what a sandbox sees
        extract_in_child(layer, tmp / cache.LAYER_SUBDIR, name)

    return cache.publish_layer(cache.layer_dir(cache_dir, layer.digest), build, interrupted=interrupted)


def extract_in_child(layer: Layer, dest: Path, name: str) -> None:
    """Extract in a forked child: as root with owners kept; otherwise in a user namespace, where
    the 0/0 whiteout device may be created. Errors come back over a pipe."""
    as_root = os.geteuid() == 0

    def extract() -> None:
        if not as_root:
            uid, gid = os.getuid(), os.getgid()
            L.unshare(L.CLONE_NEWUSER)
            write_id_maps(uid, gid)
        # spooled to a file beside the layer while hashed, checked, then extracted as it is read
        with tempfile.TemporaryFile(dir=dest.parent) as spool:
            digest = hashlib.sha256()
            with layer.open() as blob:
                for chunk in iter(lambda: blob.read(SPOOL_CHUNK), b""):
                    digest.update(chunk)
                    spool.write(chunk)
            actual = "sha256:" + digest.hexdigest()
            if actual != layer.digest:
                raise ImageImportError(f"blob is corrupt (its content hashes to {actual})")
            spool.seek(0)
            with decompressing(spool) as stream:
                extract_layer(stream, dest, as_root=as_root)

    def describe(exc: BaseException) -> str:
        if isinstance(exc, RefusedMember):
            return f"refused: {exc}"
        if isinstance(exc, DecompressionError | ImageImportError):
            return str(exc)
        return describe_exception(exc)

    problem = run_in_child(extract, describe)
    if problem:
        raise ImageImportError(f"image {name!r}: layer {layer.digest} cannot be imported: {problem}")


def image_layers(name: str, base: Path) -> tuple[str, Path, list[Layer]]:
    """(kind, path, layers bottom first) of the reference *name*, read but not extracted."""
    kind, path, layers, _config = image_contents(name, base)
    return kind, path, layers


def image_contents(name: str, base: Path) -> tuple[str, Path, list[Layer], ImageConfig]:
    """(kind, path, layers bottom first, config) of the reference *name*, read but not extracted."""
    kind, path, tag = parse_reference(name, base)
    if not path.exists():
        raise ImageImportError(f"image {name!r}: {path} does not exist")
    try:
        layers, config = docker_layers(path, name) if kind == "docker-archive" else oci_layers(kind, path, tag, name)
    except (OSError, KeyError, TypeError, AttributeError, ValueError, tarfile.TarError) as exc:
        raise ImageImportError(f"image {name!r}: malformed image ({type(exc).__name__}: {exc})") from None
    return kind, path, layers, config


def import_image(name: str, base: Path, cache_dir: Path) -> list[str]:
    """Import *name* (an oci:, oci-archive: or docker-archive: reference); its layer dirs, top first."""
    return import_with_config(name, base, cache_dir)[0]


def import_with_config(name: str, base: Path, cache_dir: Path) -> tuple[list[str], ImageConfig]:
    """Import *name*: its layer dirs, top first, and its config (checked, its User resolvable
    in the image's own /etc/passwd and /etc/group)."""
    kind, path, layers, config = image_contents(name, base)
    if not layers:
        raise ImageImportError(f"image {name!r}: no layers")
    if len(layers) > MAX_LAYERS:
        raise ImageImportError(f"image {name!r}: {len(layers)} layers; overlayfs takes at most {MAX_LAYERS} plus the init layer")
    dirs = [str(ensure_layer(cache_dir, layer, name)) for layer in layers]
    cache.record_image(cache_dir, name, path, [layer.digest for layer in layers], kind=kind)
    resolve_user(config, dirs[::-1], name)  # a User name must be in the image's /etc/passwd
    return dirs[::-1], config
