"""A small stdlib writer of OCI image layouts, oci-archives and docker-save archives, for tests.

Layers are built from Entry lists, including whiteouts, opaque markers, xattrs, hardlinks and
hostile member names (the writer does not validate: that is the importer's job).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Entry:
    path: str
    kind: str = "file"  # file dir symlink hardlink whiteout opaque fifo chardev
    content: bytes = b""
    mode: int = 0o644
    target: str = ""  # symlink or hardlink target
    xattrs: dict[str, str] = field(default_factory=dict)


def layer_tar(entries: list[Entry], compression: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            name = entry.path
            if entry.kind == "whiteout":
                head, _, tail = name.rpartition("/")
                name = f"{head}/.wh.{tail}" if head else f".wh.{tail}"
            elif entry.kind == "opaque":
                name = f"{name.rstrip('/')}/.wh..wh..opq"
            info = tarfile.TarInfo(name)
            info.mode = entry.mode
            info.mtime = 1_700_000_000
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in entry.xattrs.items()}
            data = None
            if entry.kind in ("file", "whiteout", "opaque"):
                info.type = tarfile.REGTYPE
                info.size = len(entry.content)
                data = io.BytesIO(entry.content)
            elif entry.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif entry.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = entry.target
            elif entry.kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = entry.target
            elif entry.kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif entry.kind == "chardev":
                info.type = tarfile.CHRTYPE
                info.devmajor, info.devminor = 1, 3
            archive.addfile(info, data)
    raw = buffer.getvalue()
    if compression == "gzip":
        return gzip.compress(raw, mtime=0)
    if compression == "zstd":
        return subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
    return raw


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put_blob(layout: Path, data: bytes) -> str:
    digest = _digest(data)
    path = layout / "blobs" / "sha256" / digest.split(":")[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def config_blob(config: Any = None) -> bytes:
    """An image config document; *config* (its "config" object: Env, WorkingDir, User) as given."""
    document: dict[str, Any] = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    if config is not None:
        document["config"] = config
    return json.dumps(document).encode()


def write_layout(layout: Path, layers: list[bytes], tag: str = "latest", config: Any = None) -> dict[str, str]:
    """An OCI image layout with one image (*config*: its config's "config" object); returns
    {layer index: digest, 'manifest': digest}."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    config = config_blob(config)
    descriptors = []
    for data in layers:
        media = "application/vnd.oci.image.layer.v1.tar" + (
            "+gzip" if data[:2] == b"\x1f\x8b" else "+zstd" if data[:4] == b"\x28\xb5\x2f\xfd" else ""
        )
        descriptors.append({"mediaType": media, "digest": _put_blob(layout, data), "size": len(data)})
    config_digest = _put_blob(layout, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config)},
            "layers": descriptors,
        }
    ).encode()
    manifest_digest = _put_blob(layout, manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    result = {str(i): d["digest"] for i, d in enumerate(descriptors)}
    result["manifest"] = manifest_digest
    return result


def write_oci_archive(path: Path, layers: list[bytes], tag: str = "latest", config: Any = None) -> None:
    layout = path.with_suffix(".layout")
    write_layout(layout, layers, tag, config)
    with tarfile.open(path, "w") as archive:
        for item in sorted(layout.rglob("*")):
            archive.add(item, arcname=str(item.relative_to(layout)), recursive=False)
    shutil.rmtree(layout)


def write_docker_archive(path: Path, layers: list[bytes], config: Any = None) -> None:
    """The legacy `docker save` layout: <id>/layer.tar per layer, a manifest.json and the config file."""
    with tarfile.open(path, "w") as archive:
        names = []
        for data in layers:
            layer_id = hashlib.sha256(data).hexdigest()
            names.append(f"{layer_id}/layer.tar")
            info = tarfile.TarInfo(f"{layer_id}/layer.tar")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        manifest = json.dumps([{"Config": "config.json", "RepoTags": ["test:latest"], "Layers": names}]).encode()
        config_data = config_blob(config) if config is not None else b"{}"
        for name, data in (("manifest.json", manifest), ("config.json", config_data)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def host_shell_entries() -> list[Entry]:
    """The host's /bin/sh and the shared libraries it loads, at the paths it loads them from: an
    image with a shell whose builtins (echo, pwd, read, cd) need nothing else."""
    shell = os.path.realpath("/bin/sh")
    paths = {"bin/sh": shell}
    ldd = subprocess.run(["ldd", shell], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        words = line.split()
        loaded = words[2] if len(words) > 2 and words[1] == "=>" else words[0]
        if loaded.startswith("/"):
            paths[loaded.lstrip("/")] = os.path.realpath(loaded)
    return [Entry(name, content=Path(real).read_bytes(), mode=0o755) for name, real in paths.items()]


def tree_snapshot(path: Path) -> list[str]:
    """Every path below *path* (for asserting that nothing was left or written)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


__all__ = [
    "Entry",
    "config_blob",
    "host_shell_entries",
    "layer_tar",
    "tree_snapshot",
    "write_docker_archive",
    "write_layout",
    "write_oci_archive",
]
