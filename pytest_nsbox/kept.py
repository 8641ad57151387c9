"""--nsbox-keep: kept writable layers of sandboxed tests, what they changed, and where they are.

A run that keeps tests has a directory of its own, ``<cache>/kept/<project>/<run>/``, one
directory per kept test in it: ``layer.tar`` (the writable layer in OCI layer form, see
box/keep.py) and ``kept.json`` (what re-entering needs: the image's layers, network, hostname,
environment, cwd, limits, the host paths the test saw; the node id, the outcome, and the
filesystem changes). Runs of one project (its rootdir) are pruned to the newest ``nsbox_keep_runs``
and to ``nsbox_keep_size`` bytes in all, oldest first.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import tarfile
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .box.keep import OPAQUE_MARKER, WHITEOUT_PREFIX, IdMap, KeptSource
from .box.steps import LEFTOVERS
from .spec import format_size, parse_size

KEEP_MODES: Final = ("none", "failed", "all")
KEEP_INI: Final = "nsbox_keep"
KEEP_RUNS_INI: Final = "nsbox_keep_runs"
KEEP_SIZE_INI: Final = "nsbox_keep_size"
DEFAULT_KEEP_RUNS: Final = 3
DEFAULT_KEEP_SIZE: Final = 2 * 2**30
KEPT_DIR: Final = "kept"
LAYER_FILE: Final = "layer.tar"
META_FILE: Final = "kept.json"
RUN_FILE: Final = "run.json"
CHANGES_SECTION: Final = "nsbox: filesystem changes"
KEPT_PROPERTY: Final = "nsbox_kept"  # user_properties: the kept test's directory
KEPT_COMMAND_PROPERTY: Final = "nsbox_kept_command"  # user_properties: the command that re-enters it
KEPT_SUMMARY_TITLE: Final = "nsbox: kept sandboxes"
NOT_KEPT: Final = "nsbox: {nodeid} failed but its sandbox was not kept: {reason}"
FORKED_NOT_KEPT: Final = "sandboxes built by forks of pytest (nsbox_prebuild = false, or no builder) are not kept"
MAX_LISTED: Final = 100  # change lines in a report; `nsbox diff` lists them all
MAX_DIFFS: Final = 10  # files with a unified diff in a report
MAX_DIFF_LINES: Final = 40
MAX_TEXT_BYTES: Final = 64 * 2**10  # a file up to this size that decodes as UTF-8 gets a diff


class KeepError(Exception):
    """A bad keep setting, or a kept test that cannot be found or used."""


@dataclass(frozen=True, slots=True)
class KeepSettings:
    mode: str = "none"
    runs: int = DEFAULT_KEEP_RUNS
    size: int = DEFAULT_KEEP_SIZE

    @property
    def active(self) -> bool:
        return self.mode != "none"


def settings_from(values: Mapping[str, tuple[str | None, str]]) -> KeepSettings:
    """From {field: (option value or None, ini value)}, option over ini; KeepError names the source."""

    def pick(name: str, option: str, ini: str) -> tuple[str, str] | None:
        raw, ini_value = values.get(name, (None, ""))
        if raw is not None:
            return str(raw).strip(), f"option {option}"
        if str(ini_value).strip():
            return str(ini_value).strip(), f"ini {ini}"
        return None

    mode, runs, size = "none", DEFAULT_KEEP_RUNS, DEFAULT_KEEP_SIZE
    got = pick("mode", "--nsbox-keep", KEEP_INI)
    if got is not None:
        mode = got[0]
        if mode not in KEEP_MODES:
            raise KeepError(f"invalid keep mode {mode!r} from {got[1]} (expected failed, all or none)")
    got = pick("runs", "--nsbox-keep-runs", KEEP_RUNS_INI)
    if got is not None:
        try:
            runs = int(got[0])
        except ValueError:
            runs = 0
        if runs < 1:
            raise KeepError(f"invalid number of kept runs {got[0]!r} from {got[1]} (expected a whole number, at least 1)")
    got = pick("size", "--nsbox-keep-size", KEEP_SIZE_INI)
    if got is not None:
        try:
            size = parse_size(got[0])
        except ValueError as exc:
            raise KeepError(f"invalid size of kept layers {got[0]!r} from {got[1]} ({exc})") from None
        if size <= 0:
            raise KeepError(f"invalid size of kept layers {got[0]!r} from {got[1]} (expected a size such as 500M, 2G)")
    return KeepSettings(mode, runs, size)


# --- where kept runs live ------------------------------------------------------------------------


def project_dir(cache_dir: Path, rootdir: Path) -> Path:
    """The kept runs of the project at *rootdir*."""
    real = os.path.realpath(rootdir)
    digest = hashlib.sha256(real.encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(real) or "root")[:40]
    return cache_dir / KEPT_DIR / f"{name}-{digest}"


def test_dir_name(nodeid: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", nodeid).strip("_")[:80]
    return f"{safe}-{hashlib.sha256(nodeid.encode()).hexdigest()[:8]}"


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def run_started(run: Path) -> float:
    try:
        return float(json.loads((run / RUN_FILE).read_text())["started"])
    except (OSError, ValueError, KeyError, TypeError):
        try:
            return run.stat().st_mtime
        except OSError:
            return 0.0


def runs_newest_first(project: Path) -> list[Path]:
    try:
        runs = [p for p in project.iterdir() if p.is_dir() and (p / RUN_FILE).exists()]
    except OSError:
        return []
    return sorted(runs, key=run_started, reverse=True)


def tree_size(path: Path) -> int:
    total = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_size
    return total


def prune(project: Path, settings: KeepSettings, current: Path | None) -> None:
    """Keep the newest *settings.runs* runs and at most *settings.size* bytes (oldest first out;
    the current run is never removed here)."""
    runs = runs_newest_first(project)
    for old in runs[settings.runs :]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    runs = [r for r in runs[: settings.runs]]
    sizes = {run: tree_size(run) for run in runs}
    total = sum(sizes.values())
    for old in reversed(runs):
        if total <= settings.size:
            break
        if old == current:
            continue
        shutil.rmtree(old, ignore_errors=True)
        total -= sizes[old]


def find_kept(project: Path, nodeid: str, run: str | None = None) -> Path:
    """The newest kept directory of *nodeid* (in run *run*, if given); KeepError if none."""
    runs = runs_newest_first(project)
    if run is not None:
        runs = [r for r in runs if r.name == run]
        if not runs:
            raise KeepError(f"no kept run {run!r} in {project}")
    name = test_dir_name(nodeid)
    for candidate in runs:
        found = sorted(candidate.glob(f"{name}*/{META_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
        if found:
            return found[0].parent
    known = sorted({json.loads(m.read_text()).get("nodeid", "?") for r in runs for m in r.glob(f"*/{META_FILE}")})
    listed = ", ".join(known[:10]) if known else "none"
    raise KeepError(
        f"no kept sandbox of {nodeid!r} in {project} (run pytest with --nsbox-keep=failed or all); kept tests: {listed}"
    )


def read_meta(kept: Path) -> dict[str, Any]:
    try:
        data = json.loads((kept / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise KeepError(f"cannot read {kept / META_FILE}: {exc}") from None
    if not isinstance(data, dict):
        raise KeepError(f"{kept / META_FILE} is not a kept test's record")
    return data


class RunDir:
    """The current run's directory (created on the first kept test). Under xdist every worker
    uses the same one: its name comes from xdist's test run id."""

    def __init__(self, project: Path, rootdir: Path, run_id: str | None = None) -> None:
        self.project = project
        self.rootdir = rootdir
        run_id = re.sub(r"[^A-Za-z0-9]", "", run_id or "") or uuid.uuid4().hex
        self.path = project / f"run-{time.strftime('%Y%m%d')}-{run_id[:12]}"

    def ensure(self) -> Path:
        _private_dir(self.path)
        run_file = self.path / RUN_FILE
        if not run_file.exists():
            with contextlib.suppress(FileExistsError):
                fd = os.open(run_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as handle:
                    json.dump({"started": time.time(), "rootdir": str(self.rootdir)}, handle)
        return self.path


# --- the environment a test had ----------------------------------------------------------------


def test_environment(environ: Mapping[str, str], image_env: Mapping[str, str], drop_env: Iterable[str]) -> dict[str, str]:
    """The environment the test process had: pytest's, less drop_env, with the image's Env over it."""
    patterns = tuple(drop_env)
    env = {k: v for k, v in environ.items() if not any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    env.update(image_env)
    return env


# --- what a layer changed ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # "A", "C" or "D"
    path: str
    size: int | None  # bytes of a file or symlink; None for a directory
    what: str  # "file", "dir", "symlink", "fifo"

    def line(self) -> str:
        size = "dir" if self.size is None else format_size(self.size) if self.size >= 1024 else f"{self.size} B"
        return f"{self.kind} {self.path} ({self.what}, {size})" if self.what != "dir" else f"{self.kind} {self.path} (dir)"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "size": self.size, "type": self.what}


@dataclass
class Changes:
    changes: list[Change] = field(default_factory=list)
    diffs: dict[str, str] = field(default_factory=dict)  # path: unified diff against the image's version
    not_kept: list[str] = field(default_factory=list)  # sockets, device nodes, files pytest's user cannot read

    def to_json(self) -> dict[str, Any]:
        return {"changes": [c.to_json() for c in self.changes], "diffs": self.diffs, "not_kept": self.not_kept}

    @classmethod
    def from_json(cls, data: Any) -> Changes:
        if not isinstance(data, dict):
            return cls()
        changes = [
            Change(str(c["kind"]), str(c["path"]), c.get("size"), str(c.get("type", "file")))
            for c in data.get("changes", [])
            if isinstance(c, dict) and "kind" in c and "path" in c
        ]
        diffs = {str(k): str(v) for k, v in (data.get("diffs") or {}).items()}
        return cls(changes, diffs, [str(p) for p in data.get("not_kept") or []])

    def render(self, *, limit: int | None = MAX_LISTED, diffs: int | None = MAX_DIFFS, more_hint: str = "") -> str:
        if not self.changes and not self.not_kept:
            return "no changes"
        shown = self.changes if limit is None else self.changes[:limit]
        lines = [c.line() for c in shown]
        if len(self.changes) > len(shown):
            lines.append(f"... and {len(self.changes) - len(shown)} more{more_hint}")
        counts = {k: sum(1 for c in self.changes if c.kind == k) for k in "ACD"}
        lines.append(f"{len(self.changes)} path(s): {counts['A']} added, {counts['C']} changed, {counts['D']} deleted")
        if self.not_kept:
            shown_paths = ", ".join(self.not_kept[:10]) + (", ..." if len(self.not_kept) > 10 else "")
            lines.append(f"not kept (sockets, device nodes, unreadable files): {shown_paths}")
        texts = list(self.diffs.items())
        for _path, text in texts if diffs is None else texts[:diffs]:
            lines.append("")
            lines.append(text.rstrip("\n"))
        if diffs is not None and len(texts) > diffs:
            lines.append(f"... diffs of {len(texts) - diffs} more file(s){more_hint}")
        return "\n".join(lines)


def _what(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "file"


def lookup(lowers: tuple[str, ...], rel: str) -> str | None:
    """The host path of *rel* in the layers *lowers* (top first) as an overlay shows it, or None
    (absent, whited out, or hidden by an opaque directory)."""
    parts = [p for p in rel.split("/") if p]
    for lower in lowers:
        current = lower
        for index, part in enumerate(parts):
            current = os.path.join(current, part)
            try:
                st = os.lstat(current)
            except OSError:
                break  # not in this layer: look below
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return None
            if index == len(parts) - 1:
                return current
            if not stat.S_ISDIR(st.st_mode):
                return None
            if len(lowers) > 1 and _opaque(current):
                return lookup((current,), "/".join(parts[index + 1 :]))
        else:
            if not parts:
                return lower
    return None


def _opaque(path: str) -> bool:
    from .box.keep import is_opaque

    return is_opaque(path)


def _listing(lowers: tuple[str, ...], rel: str) -> list[str]:
    """Names in directory *rel* of the layers (merged, whiteouts applied; approximately: the
    first layer's opaque marker ends the merge)."""
    names: set[str] = set()
    hidden: set[str] = set()
    for lower in lowers:
        found = lookup((lower,), rel)
        if found is None or not os.path.isdir(found) or os.path.islink(found):
            continue
        with contextlib.suppress(OSError):
            for entry in os.scandir(found):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    hidden.add(entry.name)
                elif entry.name not in hidden:
                    names.add(entry.name)
        if _opaque(found):
            break
    return sorted(names)


def _text(data: bytes) -> list[str] | None:
    if len(data) > MAX_TEXT_BYTES or b"\0" in data:
        return None
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def _unified(path: str, before: bytes | None, after: bytes) -> str | None:
    old = [] if before is None else _text(before)
    new = _text(after)
    if old is None or new is None:
        return None
    lines = list(
        difflib.unified_diff(old, new, fromfile=f"image:{path}" if before is not None else "/dev/null", tofile=f"kept:{path}")
    )
    if not lines:
        return None
    if len(lines) > MAX_DIFF_LINES:
        lines = [*lines[:MAX_DIFF_LINES], f"... {len(lines) - MAX_DIFF_LINES} more diff line(s)\n"]
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)


def compute_changes(
    layer: Path,
    sources: list[KeptSource],
    hidden: Iterable[str],
    uids: IdMap,
    gids: IdMap,
    init: Mapping[str, str] | None = None,
) -> Changes:
    """Each path the kept *layer* adds, changes or deletes against what lies below it (*init*:
    the init layer's files by path, which lay over the image's)."""
    init = init or {}
    mount_parents = {posixpath.dirname(h) for h in hidden} | {
        "/".join(h.split("/")[: i + 1]) for h in hidden for i in range(h.count("/"))
    }
    by_depth = sorted(sources, key=lambda s: len(s.path), reverse=True)
    out = Changes()
    listed: set[str] = set()
    opaque_dirs: list[str] = []

    def source_of(path: str) -> tuple[KeptSource, str] | None:
        for source in by_depth:
            if source.path == "/" or path == source.path or path.startswith(source.path.rstrip("/") + "/"):
                return source, path[len(source.path.rstrip("/")) :].lstrip("/")
        return None

    def below(path: str) -> str | None:
        found = source_of(path)
        if found is None or not found[0].lowers:
            return None
        return lookup(found[0].lowers, found[1])

    with tarfile.open(layer) as archive:
        members = archive.getmembers()
        names = {"/" + m.name.strip("/") for m in members}
        for member in members:
            path = "/" + member.name.strip("/")
            directory, base = posixpath.split(path)
            if base == OPAQUE_MARKER:
                opaque_dirs.append(directory)
                continue
            if base.startswith(WHITEOUT_PREFIX):
                gone = posixpath.join(directory, base[len(WHITEOUT_PREFIX) :])
                if gone in init:
                    out.changes.append(Change("D", gone, len(init[gone].encode()), "file"))
                    continue
                host = below(gone)
                size = None
                what = "file"
                if host is not None:
                    st = os.lstat(host)
                    what = _what(st.st_mode)
                    size = None if what == "dir" else st.st_size
                out.changes.append(Change("D", gone, size, what))
                continue
            if member.isdir() and any(s.path == path for s in sources):
                continue  # a writable layer's own top: changes below it are listed
            if member.isdir() and path.strip("/") in mount_parents and below(path) is None:
                continue  # a directory the plan made to reach a mount point
            if path in init:
                kind = _compare_text(archive, member, init[path].encode())
            else:
                kind = _compare(archive, member, below(path), uids, gids)
            if kind is None:
                continue
            size = None if member.isdir() else member.size if member.isreg() else len(member.linkname)
            what = "dir" if member.isdir() else "symlink" if member.issym() else "fifo" if member.isfifo() else "file"
            out.changes.append(Change(kind, path, size, what))
            listed.add(path)
            if member.isreg() and len(out.diffs) < MAX_DIFFS * 10:
                handle = archive.extractfile(member)
                after = handle.read(MAX_TEXT_BYTES + 1) if handle is not None else b""
                host = below(path)
                before = init[path].encode() if path in init else None
                if before is None and host is not None and os.path.isfile(host) and not os.path.islink(host):
                    with contextlib.suppress(OSError), open(host, "rb") as original:
                        before = original.read(MAX_TEXT_BYTES + 1)
                text = _unified(path, before, after)
                if text is not None:
                    out.diffs[path] = text
    for directory in opaque_dirs:  # what was below an opaque directory is gone, unless the layer has it again
        found = source_of(directory)
        if found is None or not found[0].lowers:
            continue
        for name in _listing(found[0].lowers, found[1]):
            gone = posixpath.join(directory, name)
            if gone not in names:
                host = lookup(found[0].lowers, posixpath.join(found[1], name))
                found_stat = os.lstat(host) if host else None
                what = _what(found_stat.st_mode) if found_stat else "file"
                size = None if what == "dir" or found_stat is None else found_stat.st_size
                out.changes.append(Change("D", gone, size, what))
    out.changes.sort(key=lambda c: (c.path, c.kind))
    return out


def _compare_text(archive: tarfile.TarFile, member: tarfile.TarInfo, before: bytes) -> str | None:
    if not member.isreg():
        return "C"
    handle = archive.extractfile(member)
    return None if handle is not None and handle.read() == before else "C"


def _compare(archive: tarfile.TarFile, member: tarfile.TarInfo, host: str | None, uids: IdMap, gids: IdMap) -> str | None:
    """ "A" (new), "C" (content, type, mode or owner differ) or None (only copied up)."""
    if host is None:
        return "A"
    try:
        st = os.lstat(host)
    except OSError:
        return "A"
    kinds = {tarfile.DIRTYPE: stat.S_ISDIR, tarfile.SYMTYPE: stat.S_ISLNK, tarfile.FIFOTYPE: stat.S_ISFIFO}
    is_kind = kinds.get(member.type, stat.S_ISREG)
    if not is_kind(st.st_mode):
        return "C"
    if not member.issym() and stat.S_IMODE(st.st_mode) != member.mode:
        return "C"
    if (uids.inside(st.st_uid), gids.inside(st.st_gid)) != (member.uid, member.gid):
        return "C"
    try:
        return _compare_content(archive, member, host)
    except OSError:
        return "C"  # the image's file cannot be read (rootless: another user's): say changed


def _compare_content(archive: tarfile.TarFile, member: tarfile.TarInfo, host: str) -> str | None:
    st = os.lstat(host)
    if member.issym():
        return None if os.readlink(host) == member.linkname else "C"
    if member.isreg():
        if st.st_size != member.size:
            return "C"
        handle = archive.extractfile(member)
        if handle is None:
            return "C"
        with open(host, "rb") as original:
            while True:
                a, b = original.read(1 << 16), handle.read(1 << 16)
                if a != b:
                    return "C"
                if not a:
                    return None
    return None


# --- in P: keeping a test's sandbox ------------------------------------------------------------


def may_have_failed(records: list[dict[str, Any]], done: bool, timed_out: bool, limit_hit: bool) -> bool:
    """Whether the test may turn out failed (copy its layer now, decide once the reports are built):
    it did not end by itself, a phase report failed, a limit was hit, or it left processes."""
    if not done or timed_out or limit_hit:
        return True
    for record in records:
        kind = record.get("kind")
        if kind == "report" and isinstance(record.get("data"), dict) and record["data"].get("outcome") == "failed":
            return True
        if kind in (LEFTOVERS, "internal_error"):
            return True
        if kind == "disk_usage":
            free = record.get("free")
            if type(free) is int and free < 64 * 2**10:
                return True
    return False


@dataclass
class Snapshot:
    """A test's layer, copied out before its sandbox was killed; kept or dropped once its outcome is known."""

    directory: Path
    meta: dict[str, Any]
    error: str | None = None


class Keeper:
    """--nsbox-keep in P: copies a test's writable layers out of its sandbox (before P kills it),
    then keeps them or throws them away by the test's outcome."""

    def __init__(
        self, settings: KeepSettings, cache_dir: Path, rootdir: Path, command: list[str], run_id: str | None = None
    ) -> None:
        self.settings = settings
        self.project = project_dir(cache_dir, rootdir)
        self.run = RunDir(self.project, rootdir, run_id)  # xdist's test run id: one directory for all workers
        self.command = command  # how to call the nsbox command, e.g. ["nsbox"]
        self._pending: dict[str, Snapshot] = {}

    def snapshot(
        self,
        nodeid: str,
        scratch: str | None,
        meta: dict[str, Any],
        sources: list[KeptSource],
        hidden: frozenset[str],
        init_pid: int | None,
        init: dict[str, str],
    ) -> None:
        """Copy the layer of *nodeid*'s sandbox (reached at *scratch*) into the run's directory.
        Never raises (P's loop calls it): what went wrong is the reason the test is not kept."""
        from .box.keep import LayerTooLarge, write_layer

        directory = self.run.path / f"{test_dir_name(nodeid)}.partial-{os.getpid()}"
        snapshot = Snapshot(directory, meta)
        self._pending[nodeid] = snapshot
        try:
            self.run.ensure()
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(mode=0o700)
        except OSError as exc:
            snapshot.error = f"cannot write to {self.run.path}: {exc}"
            return
        if scratch is None or init_pid is None:
            snapshot.error = "the sandbox's scratch filesystem could not be reached"
            return
        uids = IdMap.read(f"/proc/{init_pid}/uid_map")
        gids = IdMap.read(f"/proc/{init_pid}/gid_map")
        meta["uid_map"], meta["gid_map"] = [list(r) for r in uids.ranges], [list(r) for r in gids.ranges]
        meta["sources"] = [s.to_json() for s in sources]
        meta["hidden"] = sorted(hidden)
        meta["init_files"] = init
        try:
            with tarfile.open(directory / LAYER_FILE, "w", format=tarfile.PAX_FORMAT) as out:
                written = write_layer(scratch, sources, hidden, out, uids, gids, self.settings.size)
            meta["skipped"] = written.skipped
        except LayerTooLarge:
            snapshot.error = f"its writable layer is larger than nsbox_keep_size ({format_size(self.settings.size)})"
        except OSError as exc:
            snapshot.error = f"copying its writable layer failed: {exc} (was the sandbox killed with its cgroup?)"
        except Exception as exc:  # noqa: BLE001 - the test's files are untrusted input; the run goes on
            snapshot.error = f"copying its writable layer failed: {type(exc).__name__}: {exc}"

    def snapshot_failed(self, nodeid: str, reason: str) -> None:
        """The copy could not even start: *reason* is why the test is not kept."""
        self._pending[nodeid] = Snapshot(self.run.path / f"{test_dir_name(nodeid)}.partial-{os.getpid()}", {}, reason)

    def finish(self, nodeid: str, failed: bool, outcome: str, forked: bool) -> tuple[Path | None, str | None, Changes | None]:
        """(kept directory, why a failed test was not kept, its changes) once *nodeid*'s outcome is known."""
        snapshot = self._pending.pop(nodeid, None)
        wanted = self.settings.mode == "all" or (self.settings.mode == "failed" and failed)
        if not wanted:
            if snapshot is not None:
                shutil.rmtree(snapshot.directory, ignore_errors=True)
            return None, None, None
        if snapshot is None:
            return None, FORKED_NOT_KEPT if forked else "its sandbox ended before it could be copied", None
        if snapshot.error is not None:
            shutil.rmtree(snapshot.directory, ignore_errors=True)
            return None, snapshot.error, None
        meta = snapshot.meta
        meta["outcome"] = outcome
        meta["kept_at"] = time.time()
        sources = [KeptSource(s["path"], s["scratch"], tuple(s["lowers"]), frozenset(s["stubs"])) for s in meta["sources"]]
        uids = IdMap(tuple(tuple(r) for r in meta["uid_map"]))  # type: ignore[misc]
        gids = IdMap(tuple(tuple(r) for r in meta["gid_map"]))  # type: ignore[misc]
        changes = compute_changes(snapshot.directory / LAYER_FILE, sources, meta["hidden"], uids, gids, meta.get("init_files"))
        changes.not_kept = list(meta.get("skipped") or [])
        meta["changes"] = changes.to_json()
        fd = os.open(snapshot.directory / META_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(meta, handle, indent=1)
        final = snapshot.directory.with_name(test_dir_name(nodeid))
        index = 1
        while final.exists():  # a rerun of the same test in this run
            index += 1
            final = snapshot.directory.with_name(f"{test_dir_name(nodeid)}-{index}")
        snapshot.directory.rename(final)
        prune(self.project, self.settings, self.run.path)
        if tree_size(self.project) > self.settings.size:
            shutil.rmtree(final, ignore_errors=True)
            return None, f"the kept layers of this run passed nsbox_keep_size ({format_size(self.settings.size)})", None
        return final, None, changes

    def shell_command(self, nodeid: str) -> str:
        import shlex

        return shlex.join([*self.command, "shell", "--kept", nodeid])

    def close(self) -> None:
        for snapshot in self._pending.values():
            shutil.rmtree(snapshot.directory, ignore_errors=True)
        self._pending.clear()


# --- using a kept layer: nsbox shell --kept, export ----------------------------------------------


def extract_kept(kept: Path, dest: Path) -> None:
    """The kept layer as an overlay layer in the empty directory *dest* (whiteouts as 0/0
    character devices, opaque directories marked), extracted by the checked extractor of
    imported images: in a user namespace of its own when not root (mknod of a whiteout)."""
    from .box import _linux as L
    from .box.child import run_in_child
    from .box.steps import write_id_maps
    from .images.extract import extract_layer

    as_root = os.geteuid() == 0

    def extract() -> None:
        if not as_root:
            uid, gid = os.getuid(), os.getgid()
            L.unshare(L.CLONE_NEWUSER)
            write_id_maps(uid, gid)
        with open(kept / LAYER_FILE, "rb") as blob:
            extract_layer(blob, dest, as_root=as_root)

    problem = run_in_child(extract)
    if problem:
        raise KeepError(f"cannot extract the kept layer {kept / LAYER_FILE}: {problem}")


def image_root(meta: Mapping[str, Any]) -> str | tuple[str, ...]:
    """The image the kept test ran on ("host", a rootfs directory, or layer directories top
    first); KeepError if it is gone (a pruned cache, a removed directory)."""
    root = meta.get("image_root")
    if root == "host":
        return "host"
    layers = tuple(root) if isinstance(root, list) else (root,) if isinstance(root, str) else ()
    if not layers or not all(isinstance(p, str) for p in layers):
        raise KeepError(f"the kept record names no usable image: {root!r}")
    missing = [p for p in layers if not os.path.isdir(p)]
    if missing:
        raise KeepError(
            f"the image {meta.get('image')!r} of the kept test is gone: {missing[0]} does not exist "
            f"(pruned from the cache? build or import it again, then run the test again)"
        )
    return layers if isinstance(root, list) else layers[0]
