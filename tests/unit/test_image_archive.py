"""A cached layer packed as an OCI layer tar and extracted again is the same layer."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest

from pytest_nsbox.images.archive import pack_layer
from pytest_nsbox.images.extract import extract_layer


def test_a_layer_survives_pack_and_extract(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "etc" / "app").mkdir(parents=True)
    (layer / "etc" / "app" / "conf").write_text("x = 1\n")
    os.chmod(layer / "etc" / "app" / "conf", 0o640)
    os.setxattr(layer / "etc" / "app" / "conf", "user.origin", b"test")
    os.symlink("app/conf", layer / "etc" / "link")
    os.symlink("app", layer / "etc" / "dirlink")  # a symlink to a directory is not descended into
    (layer / "bin").mkdir()
    os.chmod(layer / "bin", 0o711)
    packed = io.BytesIO()
    pack_layer(layer, packed)
    packed.seek(0)
    out = tmp_path / "out"
    out.mkdir()
    extract_layer(packed, out, as_root=os.geteuid() == 0)
    assert (out / "etc" / "app" / "conf").read_text() == "x = 1\n"
    assert oct((out / "etc" / "app" / "conf").stat().st_mode & 0o7777) == oct(0o640)
    assert os.getxattr(out / "etc" / "app" / "conf", "user.origin") == b"test"
    assert os.readlink(out / "etc" / "link") == "app/conf" and os.readlink(out / "etc" / "dirlink") == "app"
    assert oct((out / "bin").stat().st_mode & 0o7777) == oct(0o711)


HEX = "ab" * 32


def _archive(path: Path, index: object, members: dict[str, bytes] | None = None) -> Path:
    import json
    import tarfile

    with tarfile.open(path, "w") as archive:
        for name, data in {"nsbox-images.json": json.dumps(index).encode(), **(members or {})}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ([], "has format 'list', expected 1"),
        ({"format": 1, "layers": [], "images": []}, "must hold 'layers' (an object) and 'images' (a list)"),
        ({"format": 1, "layers": {"sha256:../../x": {"sha256": HEX}}, "images": []}, "bad layer id 'sha256:../../x'"),
        ({"format": 1, "layers": {}, "images": [{"name": "x", "layers": ["sha256:" + HEX]}]}, "which the file does not hold"),
        ({"format": 1, "layers": {}, "images": [{"name": "x", "layers": ["sha256:../../.ssh"]}]}, "which the file does not hold"),
        ({"format": 1, "layers": {}, "images": [{"name": 5, "layers": []}]}, "expected strings for name"),
    ],
)
def test_a_hostile_index_is_refused_and_nothing_is_recorded(tmp_path: Path, index: object, message: str) -> None:
    from pytest_nsbox.images import archive, cache
    from pytest_nsbox.images.errors import ImageImportError

    with pytest.raises(ImageImportError, match=re.escape(message)):
        archive.load(tmp_path / "cache", _archive(tmp_path / "images.tar", index))
    assert not cache.list_images(tmp_path / "cache")


def test_records_with_ids_that_are_not_layer_ids_are_ignored(tmp_path: Path) -> None:
    from pytest_nsbox.images import cache

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "planted.json").write_text('{"name": "innocent", "layers": ["sha256:/"], "kind": "oci"}')
    assert cache.list_images(tmp_path) == []
    with pytest.raises(ValueError, match="not a layer id"):
        cache.layer_dir(tmp_path, "sha256:../../x")
