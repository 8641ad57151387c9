"""Safe extraction of one image layer (a tar, maybe compressed) into an empty directory.

Extraction trusts nothing in the archive: every member is created relative to a directory
descriptor of its parent, walked component by component without following symlinks, so no member
(``../``, an absolute path, a path through a symlink of this or any layer, a hardlink out of the
tree) can write outside the layer's directory. Whiteouts become what overlayfs in a user
namespace reads: a 0/0 character device for ``.wh.NAME`` and ``user.overlay.opaque=y`` for
``.wh..wh..opq``. Device nodes are never created (a sandbox has its own ``/dev``).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Final, cast

MAX_MEMBERS: Final = 1_000_000
WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"
OPAQUE_XATTR: Final = "user.overlay.opaque"
GZIP_MAGIC: Final = b"\x1f\x8b"
ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"


class RefusedMember(Exception):
    """A member of a layer that would escape its directory or is not allowed."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"member {member!r}: {reason}")


class DecompressionError(Exception):
    """A compressed layer cannot be decompressed here."""


@contextlib.contextmanager
def decompressing(spool: IO[bytes]) -> Iterator[IO[bytes]]:
    """The layer in the seekable *spool*, decompressed as it is read (gzip, zstd or plain): a
    layer of gigabytes is never held in memory."""
    head = spool.read(4)
    spool.seek(0)
    if head[:2] == GZIP_MAGIC:
        with gzip.GzipFile(fileobj=spool, mode="rb") as stream:
            yield cast(IO[bytes], stream)
    elif head == ZSTD_MAGIC:
        if shutil.which("zstd") is None:
            raise DecompressionError("zstd-compressed layer, and no 'zstd' command to decompress it (apt install zstd)")
        with tempfile.TemporaryFile() as errors:
            os.lseek(spool.fileno(), 0, os.SEEK_SET)  # zstd reads the descriptor, not the buffered file
            proc = subprocess.Popen(["zstd", "-dc"], stdin=spool.fileno(), stdout=subprocess.PIPE, stderr=errors)
            assert proc.stdout is not None
            try:
                yield proc.stdout
                while proc.stdout.read(1 << 16):
                    pass  # what the tar reader left (its end blocks): zstd must not die of SIGPIPE
            finally:
                proc.stdout.close()
                code = proc.wait()
            if code != 0:
                errors.seek(0)
                raise DecompressionError(f"zstd could not decompress the layer: {errors.read().decode(errors='replace')}")
    else:
        yield spool


def _components(member: str) -> list[str]:
    name = member
    while name.startswith("./"):
        name = name[2:]
    if name.startswith("/"):
        raise RefusedMember(member, "absolute path")
    parts = [p for p in name.split("/") if p and p != "."]
    if any(p == ".." for p in parts):
        raise RefusedMember(member, "'..' in the path")
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
                    raise RefusedMember(member, f"path goes through {part!r}, which is not a directory (a symlink?)") from None
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

    Raises RefusedMember for a member that would escape or is not allowed.
    """
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    count = 0
    directories: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(fileobj=blob, mode="r|") as archive:
            for member in archive:
                count += 1
                if count > MAX_MEMBERS:
                    raise RefusedMember(member.name, f"more than {MAX_MEMBERS} members")
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
                raise RefusedMember(member.name, "malformed whiteout")
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
                raise RefusedMember(member.name, "hardlink to the layer's root")
            with _parent_fd(root_fd, link_parts, member.name) as link_fd:
                link_mode = os.stat(link_parts[-1], dir_fd=link_fd, follow_symlinks=False).st_mode
                if not stat.S_ISREG(link_mode):
                    reason = f"hardlink to {member.linkname!r}, which is not a regular file of this layer"
                    raise RefusedMember(member.name, reason)
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
