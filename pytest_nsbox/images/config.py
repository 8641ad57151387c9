"""An image's config: the environment, working directory and user it asks for.

An OCI image config (and the config file of a ``docker save`` archive) carries them in its
``config`` object as ``Env`` (``["KEY=VALUE", ...]``), ``WorkingDir`` (an absolute path) and
``User`` (``uid[:gid]`` or ``name[:group]``). They are checked like any hostile input; a user
given by name is looked up in the image's own ``/etc/passwd`` and ``/etc/group``, read from its
layer directories without following a symlink out of them (``read_image_file``). Recipes make
the same ``ImageConfig`` from their base and their ``env`` and ``workdir`` steps.

Where it applies (the policy lives with the callers): ``nsbox shell`` and recipe ``run`` steps
apply all three, as ``docker run`` does; a sandboxed test gets the Env over pytest's environment
(``environment_for_tests``), keeps the cwd rule and runs as root inside.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from ..box import subids
from .errors import ImageError, ImageImportError

MAX_SYMLINKS: Final = 40  # as the kernel's path walk
MAX_ID_FILE: Final = 4 * 2**20  # bytes of /etc/passwd or /etc/group read at most
MAX_ID: Final = 2**32 - 2  # (uid_t)-1 means "unchanged" to setuid(2)
NAME: Final = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}\$?")
OPAQUE_XATTRS: Final = ("trusted.overlay.opaque", "user.overlay.opaque")
DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # docker run's, when the image has none

BAD_FIELD: Final = "image {image!r}: config field {field} {problem}"
ENV_EXPECTED: Final = 'must be a list of "KEY=VALUE" strings'
USER_EXPECTED: Final = "must be 'uid[:gid]' or 'name[:group]'"
NO_SUCH_USER: Final = "image {image!r}: config field User {user!r}: no user {name!r} in the image's /etc/passwd"
NO_SUCH_GROUP: Final = "image {image!r}: config field User {user!r}: no group {name!r} in the image's /etc/group"
USER_OUT_OF_RANGE: Final = "{needed}, but a sandbox maps ids 0..{last} only"
USER_NOT_MAPPABLE: Final = "{needed}, but only your own uid can be mapped here (as root inside): {reason}"
PYTEST_OWNED: Final = ("PYTHONPATH", "PYTHONHOME", "PYTEST_*", "COV_CORE_*", "COVERAGE_*")
"""Variables a sandboxed test keeps from pytest's process whatever the image's Env says: they
steer the interpreter that runs the test (and its ``sys.executable`` subprocesses), pytest and
coverage measurement (pytest-cov's subprocess support, ``COVERAGE_PROCESS_START``)."""


class ImageConfigError(ImageImportError):
    """An image's config is malformed, or its User cannot be resolved; names the image and field."""


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """What an image asks of the processes run in it ("" = not set)."""

    env: tuple[tuple[str, str], ...] = ()  # in order, each key once
    workdir: str = ""
    user: str = ""

    def environ(self) -> dict[str, str]:
        return dict(self.env)

    def with_env(self, more: Mapping[str, str]) -> ImageConfig:
        """Like Dockerfile ENV: *more* is set over the image's Env."""
        return replace(self, env=tuple({**dict(self.env), **more}.items()))

    def with_workdir(self, path: str) -> ImageConfig:
        """Like Dockerfile WORKDIR: a relative *path* is relative to the current one."""
        return replace(self, workdir=posixpath.normpath(posixpath.join(self.workdir or "/", path)))


@dataclass(frozen=True, slots=True)
class ImageUser:
    """An image's User, resolved: the ids a process switches to, and the user's home."""

    spec: str  # as the image gives it
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups from the image's /etc/group
    home: str = "/"

    @property
    def is_root(self) -> bool:
        return self.uid == 0 and self.gid == 0 and not self.groups


# --- parsing ---------------------------------------------------------------------------------


def parse_image_config(document: Any, image: str) -> ImageConfig:
    """The Env, WorkingDir and User of an OCI/docker image config document; ImageConfigError
    names the image and the field that is malformed."""
    if not isinstance(document, dict):
        raise ImageConfigError(f"image {image!r}: its config is not a JSON object")
    config = document.get("config")
    if config is None:
        return ImageConfig()
    if not isinstance(config, dict):
        raise ImageConfigError(BAD_FIELD.format(image=image, field="config", problem="must be an object"))
    return ImageConfig(
        env=tuple(parse_env(config.get("Env"), image).items()),
        workdir=parse_workdir(config.get("WorkingDir"), image),
        user=parse_user(config.get("User"), image),
    )


def parse_env(value: Any, image: str) -> dict[str, str]:
    """Env: a list of "KEY=VALUE" strings (null: none); a key given twice takes the later value."""
    if value is None:
        return {}
    if not isinstance(value, list):
        raise ImageConfigError(BAD_FIELD.format(image=image, field="Env", problem=f"{ENV_EXPECTED}, not {_short(value)}"))
    env: dict[str, str] = {}
    for index, item in enumerate(value):
        if not isinstance(item, str) or "=" not in item or item.startswith("=") or "\0" in item:
            raise ImageConfigError(
                BAD_FIELD.format(image=image, field="Env", problem=f"{ENV_EXPECTED}; item {index} is {_short(item)}")
            )
        key, _, val = item.partition("=")
        env[key] = val
    return env


def parse_workdir(value: Any, image: str) -> str:
    """WorkingDir: an absolute path, normalized ("" or null: not set)."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        problem = f"must be an absolute path, not {_short(value)}"
        raise ImageConfigError(BAD_FIELD.format(image=image, field="WorkingDir", problem=problem))
    return posixpath.normpath(value)


def parse_user(value: Any, image: str) -> str:
    """User: 'uid', 'uid:gid', 'name', 'name:group' (names or ids on either side); "" or null: not set."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or _split_user(value) is None:
        raise ImageConfigError(BAD_FIELD.format(image=image, field="User", problem=f"{USER_EXPECTED}, not {_short(value)}"))
    return value


def _split_user(value: str) -> tuple[str, str | None] | None:
    user, colon, group = value.partition(":")
    parts = [user, group] if colon else [user]
    for part in parts:
        if part.isdigit() and part.isascii():
            if int(part) > MAX_ID:
                return None
        elif not NAME.fullmatch(part):
            return None
    return user, (group if colon else None)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- the user, resolved against the image's files ------------------------------------------------


def resolve_user(config: ImageConfig, layers: Sequence[str], image: str) -> ImageUser | None:
    """The config's User as ids (names looked up in the image's /etc/passwd and /etc/group in
    *layers*, top first); None if the config sets no User."""
    if not config.user:
        return None
    split = _split_user(config.user)
    if split is None:  # parse_user checked it; a hand-made config may not have been
        raise ImageConfigError(BAD_FIELD.format(image=image, field="User", problem=f"{USER_EXPECTED}, not {_short(config.user)}"))
    user_part, group_part = split
    passwd = _id_file(layers, "/etc/passwd", image)
    entry: tuple[str, int, int, str] | None = None  # name, uid, gid, home
    if user_part.isdigit():
        uid = int(user_part)
        entry = next((e for e in passwd if e[1] == uid), None)
    else:
        entry = next((e for e in passwd if e[0] == user_part), None)
        if entry is None:
            raise ImageConfigError(NO_SUCH_USER.format(image=image, user=config.user, name=user_part))
        uid = entry[1]
    groups_file = _group_file(layers, image)
    if group_part is None:
        gid = entry[2] if entry is not None else 0
    elif group_part.isdigit():
        gid = int(group_part)
    else:
        found = next((g for g in groups_file if g[0] == group_part), None)
        if found is None:
            raise ImageConfigError(NO_SUCH_GROUP.format(image=image, user=config.user, name=group_part))
        gid = found[1]
    supplementary: tuple[int, ...] = ()
    if entry is not None:
        supplementary = tuple(sorted({g[1] for g in groups_file if entry[0] in g[2]} - {gid}))
    return ImageUser(config.user, uid, gid, supplementary, entry[3] if entry is not None and entry[3] else "/")


def _id_file(layers: Sequence[str], path: str, image: str) -> list[tuple[str, int, int, str]]:
    """(name, uid, gid, home) of each well-formed line of the image's passwd file."""
    entries = []
    for line in _lines(layers, path, image):
        fields = line.split(":")
        if len(fields) >= 6 and fields[2].isdigit() and fields[3].isdigit():
            entries.append((fields[0], int(fields[2]), int(fields[3]), fields[5]))
    return entries


def _group_file(layers: Sequence[str], image: str) -> list[tuple[str, int, tuple[str, ...]]]:
    """(name, gid, members) of each well-formed line of the image's /etc/group."""
    entries = []
    for line in _lines(layers, "/etc/group", image):
        fields = line.split(":")
        if len(fields) >= 4 and fields[2].isdigit():
            entries.append((fields[0], int(fields[2]), tuple(m for m in fields[3].split(",") if m)))
    return entries


def _lines(layers: Sequence[str], path: str, image: str) -> list[str]:
    try:
        data = read_image_file(layers, path)
    except OSError as exc:
        raise ImageConfigError(f"image {image!r}: cannot read {path} of the image to resolve its User: {exc}") from None
    if data is None:
        return []
    return [line for line in data.decode(errors="replace").splitlines() if line and not line.startswith("#")]


# --- reading a file of a layered image, safely -----------------------------------------------------

_MISSING, _HIDDEN = "missing", "hidden"


def read_image_file(layers: Sequence[str], path: str, limit: int = MAX_ID_FILE) -> bytes | None:
    """The content of the regular file *path* as an overlay of *layers* (top first) shows it, or
    None if there is none. Symlinks are followed inside the image (an absolute target starts at
    the image's root, '..' stops there), and every step is an openat() with O_NOFOLLOW below a
    layer directory, so nothing outside the layers is ever read. Whiteouts (0/0 character
    devices) and opaque directories (overlay xattrs) hide what is below, as overlayfs does."""
    pending = [part for part in path.split("/") if part][::-1]  # a stack: the next part last
    resolved: list[str] = []  # directories of the merged view walked so far
    links = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        kind, payload = _merged_entry(layers, [*resolved, part], limit)
        if kind == "dir":
            resolved.append(part)
        elif kind == "link":
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, f"too many symlinks resolving {path}")
            assert isinstance(payload, str)
            if payload.startswith("/"):
                resolved = []
            pending.extend([p for p in payload.split("/") if p][::-1])
        elif kind == "file":
            if any(p not in (".", "") for p in pending):
                return None  # a file used as a directory
            assert isinstance(payload, bytes)
            return payload
        else:
            return None
    return None  # a directory


def _merged_entry(layers: Sequence[str], parts: list[str], limit: int) -> tuple[str | None, bytes | str | None]:
    """What the overlay shows at *parts* (whose parents are directories in the merged view):
    ("dir" | "file" | "link" | None, the file's content or the link's target)."""
    for layer in layers:
        kind, payload, opaque_above = _layer_entry(layer, parts, limit)
        if kind == _HIDDEN:
            return None, None
        if kind != _MISSING:
            return kind, payload
        if opaque_above:
            return None, None
    return None, None


def _layer_entry(layer: str, parts: list[str], limit: int) -> tuple[str | None, bytes | str | None, bool]:
    """In one layer: (kind, payload, whether a parent directory here is opaque). kind is
    _MISSING (lower layers may have it), _HIDDEN (a whiteout or a non-directory parent hides
    it), "dir", "file", "link", or None (another file type: nothing to read)."""
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    opaque = False
    try:
        for depth, name in enumerate(parts):
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return _MISSING, None, opaque
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                return _HIDDEN, None, opaque
            last = depth == len(parts) - 1
            if stat.S_ISDIR(info.st_mode):
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = child
                if last:
                    return "dir", None, opaque
                opaque = opaque or _is_opaque(fd)
            elif not last:
                return _HIDDEN, None, opaque  # this layer has a non-directory where the path needs one
            elif stat.S_ISLNK(info.st_mode):
                return "link", os.readlink(name, dir_fd=fd), opaque
            elif stat.S_ISREG(info.st_mode):
                return "file", _read_regular(fd, name, limit), opaque
            else:
                return None, None, opaque
        return "dir", None, opaque  # parts == []: the root
    finally:
        os.close(fd)


def _is_opaque(fd: int) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(fd, name) == b"y":
                return True
        except OSError:
            continue
    return False


def _read_regular(dir_fd: int, name: str, limit: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{name} is not a regular file")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 16):
            size += len(chunk)
            if size > limit:
                raise OSError(errno.EFBIG, f"{name} is larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# --- applying it ---------------------------------------------------------------------------------


def environment_for_tests(config: ImageConfig) -> dict[str, str]:
    """What a sandboxed test sets over pytest's environment: the image's Env, except the
    variables pytest's process owns (PYTEST_OWNED)."""
    return {key: value for key, value in config.env if not _pytest_owned(key)}


def _pytest_owned(key: str) -> bool:
    return any(key.startswith(p[:-1]) if p.endswith("*") else key == p for p in PYTEST_OWNED)


def run_environment(config: ImageConfig, user: ImageUser | None, defaults: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a process started in the image as ``docker run`` gives it: *defaults*,
    then the image's Env; PATH (DEFAULT_PATH) and HOME (the user's home) if neither sets them."""
    env = {"PATH": DEFAULT_PATH, **(defaults or {})}
    if user is not None and user.uid != 0:
        env["HOME"] = user.home
    env.setdefault("HOME", user.home if user is not None else "/root")
    env.update(config.env)
    return env


def become(user: ImageUser) -> None:
    """In the child, before exec: switch to the image's user (groups, gid, then uid)."""
    os.setgroups(list(user.groups))
    os.setgid(user.gid)
    os.setuid(user.uid)


def id_mapping_for(user: ImageUser | None, image: str) -> subids.IdMapping | None:
    """The id mapping a sandbox needs to run as *user* (``nsbox shell``): None (only root, the
    caller, is mapped, as for a test) for root or no User; otherwise ids 0..MAPPED_IDS, as root
    or with the caller's subordinate ids. ImageError says why the user cannot be had."""
    if user is None or user.is_root:
        return None
    needed = f"image {image!r} asks for User {user.spec!r} (uid {user.uid}, gid {user.gid})"
    if max(user.uid, user.gid, *user.groups) > subids.MAPPED_IDS:
        raise ImageError(USER_OUT_OF_RANGE.format(needed=needed, last=subids.MAPPED_IDS))
    if os.geteuid() == 0:
        return subids.root_mapping()
    try:
        return subids.find_mapping()
    except subids.SubordinateIdError as exc:
        raise ImageError(USER_NOT_MAPPABLE.format(needed=needed, reason=exc)) from None


__all__ = [
    "DEFAULT_PATH",
    "PYTEST_OWNED",
    "ImageConfig",
    "ImageConfigError",
    "ImageUser",
    "become",
    "environment_for_tests",
    "id_mapping_for",
    "parse_image_config",
    "read_image_file",
    "resolve_user",
    "run_environment",
]
