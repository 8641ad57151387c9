"""kept.py's pure parts: settings, what a layer changed against the layers below, rendering, pruning."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from pytest_nsbox import kept
from pytest_nsbox.box.keep import IdMap, KeptSource, kept_sources, mount_points
from pytest_nsbox.box.mounts import MountTable, build_plan, sandbox_paths

IDS = IdMap(((0, os.getuid(), 1),))
GIDS = IdMap(((0, os.getgid(), 1),))


def test_settings_option_over_ini_and_defaults() -> None:
    assert kept.settings_from({}) == kept.KeepSettings("none", kept.DEFAULT_KEEP_RUNS, kept.DEFAULT_KEEP_SIZE)
    got = kept.settings_from({"mode": ("all", "failed"), "runs": (None, "5"), "size": ("500M", "")})
    assert got == kept.KeepSettings("all", 5, 500 * 2**20)
    with pytest.raises(kept.KeepError, match=r"invalid keep mode 'yes' from ini nsbox_keep"):
        kept.settings_from({"mode": (None, "yes")})
    with pytest.raises(kept.KeepError, match=r"invalid number of kept runs '-1' from option --nsbox-keep-runs"):
        kept.settings_from({"runs": ("-1", "")})


def layer(path: Path, members: list[tuple[str, bytes | None, int]]) -> Path:
    """A tar layer: (name, content or None for a directory, mode)."""
    with tarfile.open(path, "w") as archive:
        for name, content, mode in members:
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.mtime = mode, 0, 0, int(time.time())
            if content is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    return path


def test_changes_against_the_layers_below(tmp_path: Path) -> None:
    image = tmp_path / "image"
    (image / "etc").mkdir(parents=True)
    (image / "etc" / "same").write_bytes(b"same\n")
    (image / "etc" / "edited").write_bytes(b"one\ntwo\n")
    (image / "etc" / "moded").write_bytes(b"x")
    (image / "etc" / "gone").write_bytes(b"12345")
    (image / "opaque").mkdir()
    (image / "opaque" / "old").write_bytes(b"old")
    for path in image.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    tar = layer(
        tmp_path / "layer.tar",
        [
            ("etc", None, 0o755),
            ("etc/same", b"same\n", 0o644),  # copied up, unchanged: not listed
            ("etc/edited", b"one\nTWO\n", 0o644),
            ("etc/moded", b"x", 0o600),
            ("etc/.wh.gone", b"", 0o644),
            ("etc/new", b"\0binary", 0o644),
            ("opaque", None, 0o755),
            ("opaque/.wh..wh..opq", b"", 0o644),
            ("opaque/fresh", b"f", 0o644),
        ],
    )
    sources = [KeptSource("/", "upper/1", (str(image),))]
    changes = kept.compute_changes(tar, sources, [], IDS, GIDS)
    lines = [c.line() for c in changes.changes]
    assert lines == [
        "C /etc/edited (file, 8 B)",
        "D /etc/gone (file, 5 B)",
        "C /etc/moded (file, 1 B)",
        "A /etc/new (file, 7 B)",
        "A /opaque/fresh (file, 1 B)",
        "D /opaque/old (file, 3 B)",
    ]
    assert list(changes.diffs) == ["/etc/edited", "/opaque/fresh"]  # no diff of a binary file
    assert "-two\n+TWO\n" in changes.diffs["/etc/edited"]
    again = kept.Changes.from_json(json.loads(json.dumps(changes.to_json())))
    assert again.render() == changes.render()


def test_a_long_list_is_capped_with_a_count() -> None:
    changes = kept.Changes([kept.Change("A", f"/tmp/f{i:03}", 1, "file") for i in range(150)])
    text = changes.render(limit=100, more_hint=" (nsbox diff lists them all)")
    assert "A /tmp/f099 (file, 1 B)" in text and "/tmp/f100" not in text
    assert "... and 50 more (nsbox diff lists them all)" in text
    assert "150 path(s): 150 added, 0 changed, 0 deleted" in text
    assert "/tmp/f149" in changes.render(limit=None)


def test_sources_of_a_host_plan(tmp_path: Path) -> None:
    rootdir = tmp_path / "project"
    rootdir.mkdir()
    paths = sandbox_paths(interpreter=[], rootdir=str(rootdir), cwd=str(rootdir), basetemp=None)
    plan = build_plan(image="host", network="none", scratch="/scratch", host_paths=paths, mounts=MountTable.read())
    by_path = {s.path: s for s in kept_sources(plan)}
    assert by_path["/etc"].lowers == ("/etc",) and by_path["/tmp"].lowers == ()
    assert by_path[str(rootdir)].lowers == (str(rootdir),)
    assert "proc" in by_path["/"].stubs  # the root's own entries are the plan's, not the test's
    assert "proc" in mount_points(plan) and str(rootdir).strip("/") in mount_points(plan)


def test_prune_keeps_the_newest_runs_and_the_size(tmp_path: Path) -> None:
    project = tmp_path / "project"
    for index in range(4):
        run = project / f"run-{index}"
        run.mkdir(parents=True)
        (run / kept.RUN_FILE).write_text(json.dumps({"started": 1000 + index}))
        (run / "blob").write_bytes(b"x" * 1000)
    kept.prune(project, kept.KeepSettings("failed", runs=3, size=10**6), current=None)
    assert sorted(p.name for p in project.iterdir()) == ["run-1", "run-2", "run-3"]
    kept.prune(project, kept.KeepSettings("failed", runs=3, size=2100), current=project / "run-2")
    assert sorted(p.name for p in project.iterdir()) == ["run-2", "run-3"]  # oldest out first; never the current
