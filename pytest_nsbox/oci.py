"""Import OCI image layouts, oci-archives and docker-save archives into a layer cache.

Each layer is extracted once into ``<cache>/layers/sha256/<hex>`` (content-addressed by the
digest of the layer blob), built in a temporary directory and published with ``rename`` under a
``filelock`` lock, so parallel pytest processes and xdist workers extract it once. Extraction
trusts nothing in the archive: every member is created relative to a directory descriptor of its
parent, walked component by component without following symlinks, so no member (``../``, an
absolute path, a path through a symlink of this or any layer, a hardlink out of the tree) can
write outside the layer's directory. Whiteouts become what overlayfs in a user namespace reads: a
0/0 character device for ``.wh.NAME`` and ``user.overlay.opaque=y`` for ``.wh..wh..opq``.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from . import _linux as L
from ._child import describe_exception, run_in_child

log = logging.getLogger(__name__)

PREFIXES: Final = ("oci:", "oci-archive:", "docker-archive:")
MAX_MEMBERS: Final = 1_000_000
MAX_LAYERS: Final = 499  # overlayfs takes 500 lower layers; one is the init layer
WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"
OPAQUE_XATTR: Final = "user.overlay.opaque"
GZIP_MAGIC: Final = b"\x1f\x8b"
ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
REF_NAME: Final = "org.opencontainers.image.ref.name"


class ImageImportError(Exception):
    """An image or one of its layers cannot be imported; the message names image, layer, member."""


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


def oci_layers(kind: str, path: Path, tag: str | None, name: str) -> list[Layer]:
    """The layers of an OCI layout directory or oci-archive, bottom first."""
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
    return layers


def _open_archive(path: Path, name: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")
    except (OSError, tarfile.TarError) as exc:
        raise ImageImportError(f"image {name!r}: cannot read archive {path}: {exc}") from None


def docker_layers(path: Path, name: str) -> list[Layer]:
    """The layers of a ``docker save`` archive (legacy layout and the OCI-hybrid one), bottom first."""
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
    return layers


# --- safe extraction -------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"member {member!r}: {reason}")


def _decompressed(handle: IO[bytes]) -> IO[bytes]:
    head = handle.read(4)
    rest = handle.read()
    data = head + rest
    if head[:2] == GZIP_MAGIC:
        return io.BytesIO(gzip.decompress(data))
    if head == ZSTD_MAGIC:
        if shutil.which("zstd") is None:
            raise ImageImportError("zstd-compressed layer, and no 'zstd' command to decompress it (apt install zstd)")
        proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=False)
        if proc.returncode != 0:
            raise ImageImportError(f"zstd could not decompress the layer: {proc.stderr.decode(errors='replace')}")
        return io.BytesIO(proc.stdout)
    return io.BytesIO(data)


def _components(member: str) -> list[str]:
    name = member
    while name.startswith("./"):
        name = name[2:]
    if name.startswith("/"):
        raise _Refused(member, "absolute path")
    parts = [p for p in name.split("/") if p and p != "."]
    if any(p == ".." for p in parts):
        raise _Refused(member, "'..' in the path")
    return parts


@contextlib.contextmanager
def _parent_fd(root_fd: int, parts: list[str], member: str) -> Iterator[int]:
    """A descriptor of the member's parent directory, walked without following symlinks."""
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, 0o755, dir_fd=fd)
                next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _Refused(member, f"path goes through {part!r}, which is not a directory (a symlink?)") from None
                raise
            os.close(fd)
            fd = next_fd
        yield fd
    finally:
        os.close(fd)


def _remove_existing(fd: int, name: str) -> None:
    try:
        mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        os.unlink(name, dir_fd=fd)


def extract_layer(blob: IO[bytes], dest: Path, *, as_root: bool) -> int:
    """Extract one layer tar into the empty directory *dest*; return the member count.

    Raises _Refused for a member that would escape or is not allowed.
    """
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    count = 0
    directories: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(fileobj=blob, mode="r|") as archive:
            for member in archive:
                count += 1
                if count > MAX_MEMBERS:
                    raise _Refused(member.name, f"more than {MAX_MEMBERS} members")
                _extract_member(archive, member, root_fd, as_root=as_root)
                if member.isdir() and _components(member.name):
                    directories.append(member)
        # Directory modes last, deepest first: a read-only directory must still take its entries.
        for member in sorted(directories, key=lambda m: -len(_components(m.name))):
            parts = _components(member.name)
            with _parent_fd(root_fd, parts, member.name) as fd:
                _apply_metadata(member, fd, parts[-1], as_root=as_root)
    finally:
        os.close(root_fd)
    return count


def _extract_member(archive: tarfile.TarFile, member: tarfile.TarInfo, root_fd: int, *, as_root: bool) -> None:
    parts = _components(member.name)
    if not parts:
        return  # "./" itself
    with _parent_fd(root_fd, parts, member.name) as fd:
        name = parts[-1]
        if name == OPAQUE_MARKER:
            _set_opaque(fd)
            return
        if name.startswith(WHITEOUT_PREFIX):
            target = name[len(WHITEOUT_PREFIX) :]
            if not target or target in (".", ".."):
                raise _Refused(member.name, "malformed whiteout")
            _remove_existing(fd, target)
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=fd)
            return
        if member.isdir():
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
            except FileExistsError:
                mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
                if not stat.S_ISDIR(mode):
                    _remove_existing(fd, name)
                    os.mkdir(name, 0o700, dir_fd=fd)
            return  # mode, owner and times at the end
        elif member.isreg():
            _remove_existing(fd, name)
            source = archive.extractfile(member)
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd)
            with os.fdopen(out, "wb") as handle:
                if source is not None:
                    shutil.copyfileobj(source, handle)
        elif member.issym():
            _remove_existing(fd, name)
            os.symlink(member.linkname, name, dir_fd=fd)
            return  # no mode, owner or times for a symlink
        elif member.islnk():
            link_parts = _components(member.linkname)
            if not link_parts:
                raise _Refused(member.name, "hardlink to the layer's root")
            with _parent_fd(root_fd, link_parts, member.name) as link_fd:
                link_mode = os.stat(link_parts[-1], dir_fd=link_fd, follow_symlinks=False).st_mode
                if not stat.S_ISREG(link_mode):
                    raise _Refused(member.name, f"hardlink to {member.linkname!r}, which is not a regular file of this layer")
                _remove_existing(fd, name)
                os.link(link_parts[-1], name, src_dir_fd=link_fd, dst_dir_fd=fd, follow_symlinks=False)
            return
        elif member.isfifo():
            _remove_existing(fd, name)
            os.mkfifo(name, 0o600, dir_fd=fd)
        else:
            return  # device nodes: a sandbox gets its own /dev; never created from an image
        _apply_metadata(member, fd, name, as_root=as_root)


def _set_opaque(fd: int) -> None:
    os.setxattr(f"/proc/self/fd/{fd}", OPAQUE_XATTR, b"y")  # directories stay writable until the end


def _apply_metadata(member: tarfile.TarInfo, fd: int, name: str, *, as_root: bool) -> None:
    path = f"/proc/self/fd/{fd}/{name}"
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            attribute = key[len("SCHILY.xattr.") :]
            if attribute.startswith("user.") or as_root:
                with contextlib.suppress(OSError):
                    os.setxattr(path, attribute, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
    if as_root:
        os.chown(name, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
    os.chmod(name, member.mode & 0o7777, dir_fd=fd, follow_symlinks=False)  # after chown: it clears setuid
    os.utime(name, (member.mtime, member.mtime), dir_fd=fd, follow_symlinks=False)


# --- the cache -------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-nsbox"


def layer_dir(cache: Path, digest: str) -> Path:
    return cache / "layers" / "sha256" / digest.partition(":")[2]


def ensure_layer(cache: Path, layer: Layer, name: str) -> Path:
    """The extracted layer, built once (atomically, under a lock) if it is not cached yet."""
    final = layer_dir(cache, layer.digest)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock  # lazy: it installs fork handlers that every sandbox fork would run
    with FileLock(str(final) + ".lock"):
        if final.is_dir():
            return final
        prefix = f".tmp-{final.name[:12]}-"
        for stale in final.parent.glob(prefix + "*"):  # we hold the lock: its builder was killed
            log.warning("nsbox: layer %s of image %r: a previous import was interrupted; importing it again", layer.digest, name)
            _remove_tree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        try:
            _extract_in_child(layer, tmp, name)
            os.rename(tmp, final)
        except BaseException:
            _remove_tree(tmp)
            raise
    return final


def _remove_tree(path: Path) -> None:
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


def _extract_in_child(layer: Layer, dest: Path, name: str) -> None:
    """Extract in a forked child: as root with owners kept; otherwise in a user namespace, where
    the 0/0 whiteout device may be created. Errors come back over a pipe."""
    as_root = os.geteuid() == 0

    def extract() -> None:
        if not as_root:
            uid, gid = os.getuid(), os.getgid()
            L.unshare(L.CLONE_NEWUSER)
            from .sandbox import write_id_maps

            write_id_maps(uid, gid)
        with layer.open() as blob:
            data = blob.read()
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != layer.digest:
            raise ImageImportError(f"blob is corrupt (its content hashes to {actual})")
        extract_layer(_decompressed(io.BytesIO(data)), dest, as_root=as_root)

    def describe(exc: BaseException) -> str:
        return f"refused: {exc}" if isinstance(exc, _Refused) else describe_exception(exc)

    problem = run_in_child(extract, describe)
    if problem:
        raise ImageImportError(f"image {name!r}: layer {layer.digest} cannot be imported: {problem}")


def import_image(name: str, base: Path, cache: Path) -> list[str]:
    """Import *name* (an oci:, oci-archive: or docker-archive: reference); its layer dirs, top first."""
    kind, path, tag = parse_reference(name, base)
    if not path.exists():
        raise ImageImportError(f"image {name!r}: {path} does not exist")
    try:
        layers = docker_layers(path, name) if kind == "docker-archive" else oci_layers(kind, path, tag, name)
    except (OSError, KeyError, TypeError, AttributeError, ValueError, tarfile.TarError) as exc:
        raise ImageImportError(f"image {name!r}: malformed image ({type(exc).__name__}: {exc})") from None
    if not layers:
        raise ImageImportError(f"image {name!r}: no layers")
    if len(layers) > MAX_LAYERS:
        raise ImageImportError(f"image {name!r}: {len(layers)} layers; overlayfs takes at most {MAX_LAYERS} plus the init layer")
    dirs = [str(ensure_layer(cache, layer, name)) for layer in layers]
    record_image(cache, name, path, [layer.digest for layer in layers])
    return dirs[::-1]


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


def tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for file in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, file)).st_size
    return total


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
    layers_root = cache / "layers" / "sha256"
    for entry in sorted(layers_root.glob("*")) if layers_root.is_dir() else []:
        if entry.is_dir() and not entry.name.startswith(".") and f"sha256:{entry.name}" not in keep:
            from filelock import FileLock  # lazy: it installs fork handlers that every sandbox fork would run
            with FileLock(str(entry) + ".lock"):
                _remove_tree(entry)
            Path(str(entry) + ".lock").unlink(missing_ok=True)
            removed.append(f"sha256:{entry.name}")
    shutil.rmtree(cache / "stacks", ignore_errors=True)  # numbered-symlink farms: rebuilt on demand
    return removed
